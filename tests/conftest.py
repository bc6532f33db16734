import sdml_ext  # noqa: F401  (before torch: the package chooses OpenMP's wait policy before it loads)
import pytest
import torch

CUDA_REASON = "no CUDA device on this machine (the GPU check script runs these on a GPU host)"

# Device axis of the test products: the CUDA cases skip with a reason when no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)]),
]


def _toml_value(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def run_config(dataset_options: dict | None = None, **settings) -> str:
    """The TOML text of a `--config` file for a small, fast training run (flat settings, then the
    [dataset_options] table), written once here for every test that starts one."""
    lines = [f"{name} = {_toml_value(value)}" for name, value in settings.items()]
    if dataset_options:
        lines += ["", "[dataset_options]"] + [f"{name} = {_toml_value(v)}" for name, v in dataset_options.items()]
    return "\n".join(lines) + "\n"
