"""sdml_ext: SDML (Scalable Deep Multimodal Learning, Hu et al., SIGIR 2019) for cross-modal retrieval.

Fused C++/CUDA kernels registered as torch ops (``torch.ops.sdml.*``, Python faces in
:mod:`sdml_ext.ops`) and the modules built on them.
"""

from . import ops
from ._extension import build_info, release_cached_host_buffers
from . import metrics
from .loss import DSAELoss
from .ops import DSAELossOutput, dsae_loss
from .store.bundle import Bundle, load

__version__ = "0.1.0"

__all__ = [
    "Bundle", "build_info", "release_cached_host_buffers", "metrics", "ops", "dsae_loss", "DSAELossOutput",
    "DSAELoss", "load", "__version__",
]
