"""Checks of what a search is given (features, ids, labels, k): one clear error naming the
argument, before any work is done."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import InputTypeError


def check_features(x, name: str = "features"):
    """A 2-D real array (numpy, including a memory map, or a CPU/CUDA tensor) without grad.

    Returns it unchanged (no copy: a memory-mapped gallery stays on disk); values are checked for
    NaN/Inf block by block where they are encoded.
    """
    if isinstance(x, Tensor):
        if x.requires_grad:
            raise ValueError(f"{name} requires grad; pass {name}.detach() (search is not differentiable)")
        dtype_ok = x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        dtype = x.dtype
    else:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as exc:
                raise InputTypeError(f"{name} is not a numeric array ({exc})") from None
        dtype_ok = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
        dtype = x.dtype
    if not dtype_ok:
        raise InputTypeError(f"{name} must hold real numbers, got dtype {dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, D], got shape {tuple(x.shape)}")
    return x


def check_ids(ids, n: int) -> tuple[str, np.ndarray | list[str] | None]:
    """(kind, values): ids given at build time for n gallery items; kind is one of ID_KINDS."""
    if ids is None:
        return "position", None
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"ids must be a sequence of {n} ids (one per gallery item), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return "int", arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "U" or (arr.dtype == object and all(isinstance(v, str) for v in arr)):
        return "str", arr
    raise InputTypeError(f"ids must be all integers or all strings, got dtype {arr.dtype}")


def check_labels(labels, n: int) -> tuple[str | None, np.ndarray | None]:
    """(kind, array): class ids [n] int64 (-1 = unlabelled) or multi-hot [n, c] uint8."""
    if labels is None:
        return None, None
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"labels must be [{n}] class ids or [{n}, c] multi-hot rows, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == np.bool_):
        raise InputTypeError(f"labels must be numeric, got dtype {y.dtype}")
    if y.ndim == 2:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("multi-hot labels must contain only 0 and 1")
        return "multi_hot", y.astype(np.uint8)
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError("labels must be integer class ids")
    y = y.astype(np.int64)
    if y.size and y.min() < -1:
        raise ValueError(f"labels must be class ids >= -1 (-1 = unlabelled), got {int(y.min())}")
    return "class_ids", y


def check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputTypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the gallery has {n} items), got {k}")
    return int(k)
