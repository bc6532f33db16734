import pytest
import torch

CUDA_REASON = "no CUDA device on this machine (the GPU check script runs these on a GPU host)"

# Device axis of the test products: the CUDA cases skip with a reason when no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)]),
]
