"""Loads the compiled extension ``sdml_ext._C`` after checking it matches the installed torch.

An extension built against one torch release does not load into another (C++ symbols change);
without this check the user would see an undefined-symbol traceback instead of what to do.
"""

from __future__ import annotations

import importlib

import torch

_REBUILD = (
    "Rebuild sdml_ext against the installed torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall ."
)


def _load():
    try:
        config = importlib.import_module("sdml_ext._build_config")
    except ImportError as exc:
        raise ImportError(
            "sdml_ext's compiled extension is missing (sdml_ext/_build_config.py not found): "
            "sdml_ext must be installed with pip, not imported from a source tree. " + _REBUILD
        ) from exc
    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"sdml_ext was built against torch {config.TORCH_VERSION} but torch {torch.__version__} "
            f"is installed. {_REBUILD}"
        )
    module = importlib.import_module("sdml_ext._C")
    return config, module


_config, _C = _load()


def build_info() -> dict:
    """How the installed extension was built.

    Returns a dict with ``torch_version`` (the torch it was compiled against), ``torch_cuda``
    (that torch's CUDA version, or None), ``cuda_kernels`` (whether CUDA kernels were compiled
    in), ``cuda_archs`` (list of compute capabilities, e.g. ``["90"]``), and ``cuda_available``
    (whether a CUDA device is usable now).
    """
    archs = [a for a in _config.CUDA_ARCHS.replace(",", ";").split(";") if a]
    return {
        "torch_version": _C.torch_version,
        "torch_cuda": _config.TORCH_CUDA_VERSION or None,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": archs if _C.with_cuda else [],
        "cuda_available": torch.cuda.is_available(),
    }


def release_cached_host_buffers() -> int:
    """Frees the CPU blocks that the kernels keep for large outputs (e.g. the loss gradient);
    returns the number of bytes released. At most 4 blocks / 1 GiB are ever kept."""
    return _C.release_cached_host_buffers()
