"""Loads the compiled extension ``sdml_ext._C`` after checking it matches the installed torch.

An extension built against one torch release does not load into another (C++ symbols change);
without this check the user would see an undefined-symbol traceback instead of what to do.
The advice depends on where sdml_ext is imported from: a source checkout (the repository root
is on sys.path, or it was installed editable) is built in place, an installed copy is reinstalled.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _source_root() -> str | None:
    """The checkout this package is imported from, or None for an installed copy."""
    root = os.path.dirname(_PACKAGE_DIR)
    if os.path.isfile(os.path.join(root, "CMakeLists.txt")) and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return root
    return None


def _advice() -> str:
    """What to run so that this copy of sdml_ext gets a compiled extension for this torch."""
    python = sys.executable or "python"
    root = _source_root()
    if root is not None:
        # Imported only because the checkout is the current directory (not an editable install):
        # an installed copy would be found from elsewhere.
        paths = [os.path.abspath(p or os.curdir) for p in sys.path]
        from_cwd = paths[:1] == [root] and root not in paths[1:]
        return (
            f"sdml_ext is imported from the source tree {root}, which holds no extension built for "
            f"the installed torch {torch.__version__}. Build it in place: `bash scripts/setup.sh`, or "
            f"`{python} -m pip install --no-build-isolation -e {root}` with the torch you use"
            + (f" (or, to import an installed sdml_ext instead, run from another directory or with `{python} -P`)"
               if from_cwd else "")
        )
    return (
        f"Reinstall sdml_ext against the installed torch {torch.__version__}, from its source "
        f"directory: `{python} -m pip install --no-build-isolation --no-deps --force-reinstall .`"
    )


def _load():
    try:
        config = importlib.import_module("sdml_ext._build_config")
    except ImportError:
        raise ImportError(
            f"sdml_ext's compiled extension is missing ({_PACKAGE_DIR} has no _build_config.py). {_advice()}"
        ) from None
    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"sdml_ext in {_PACKAGE_DIR} was built against torch {config.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed. {_advice()}"
        )
    try:
        module = importlib.import_module("sdml_ext._C")
    except ImportError as exc:  # missing .so, or one from another build of the same torch version
        raise ImportError(f"sdml_ext's compiled extension in {_PACKAGE_DIR} does not load ({exc}). {_advice()}") from exc
    return config, module


_config, _C = _load()


def build_info() -> dict:
    """How the installed extension was built.

    Returns a dict with ``torch_version`` (the torch it was compiled against), ``torch_cuda``
    (that torch's CUDA version, or None), ``cuda_kernels`` (whether CUDA kernels were compiled
    in), ``cuda_archs`` (list of compute capabilities, e.g. ``["90"]``), ``cuda_available``
    (whether a CUDA device is usable now), and ``cpu_gemm``: the code that runs the CPU
    kernels' float32 tile GEMMs in this process (``gemm``: ``"blas"``, ``"onednn"`` or ``"avx2"``,
    our own kernel) and why (``how``: measured, cached, or the ``SDML_CPU_GEMM`` override;
    ``measured_gflops``: each one's rate; the cache file). The choice is made on the first call (a measurement of a
    few tens of ms, or the cache); ``python -m sdml_ext.info`` prints all this. Raises ValueError
    for a bad ``SDML_CPU_GEMM``. ``cpu_bf16``: this CPU's bf16 units, as
    ``cosine_topk(..., precision="bf16")`` uses them, in one line. ``cpu_exact_filter``: whether
    the exact mode filters large galleries with a bf16 pass here (the same ids and scores as the
    float32 kernel alone, which ``SDML_CPU_EXACT_FILTER=off`` selects). ``cpu_loss_stores``: how the
    CPU loss kernel writes its input gradients here (streaming stores past the cache available to
    torch's threads, ordinary ones below; ``SDML_LOSS_STREAM=0/1`` overrides), in one line.
    """
    archs = [a for a in _config.CUDA_ARCHS.replace(",", ";").split(";") if a]
    return {
        "torch_version": _C.torch_version,
        "torch_cuda": _config.TORCH_CUDA_VERSION or None,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": archs if _C.with_cuda else [],
        "cuda_available": torch.cuda.is_available(),
        "cpu_gemm": _C.cpu_gemm_choice(),
        "cpu_bf16": _C.cpu_bf16_status(),
        "cpu_exact_filter": _C.cpu_exact_filter_status(),
        "cpu_loss_stores": _C.dsae_loss_cpu_stores(),
    }


def release_cached_host_buffers() -> int:
    """Frees the CPU blocks that the kernels keep for large outputs (e.g. the loss gradient);
    returns the number of bytes released. At most 4 blocks / 1 GiB are ever kept."""
    return _C.release_cached_host_buffers()
