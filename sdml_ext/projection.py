"""An external projection P read from a file, for exact reproduction of a published model.

The SDML authors ship their P as ``OrthP_512X512.mat``: a 512 x 512 orthogonal matrix of which a
c-class dataset uses the first c columns. :func:`load_projection` reads such a matrix from a
.mat (v5 or v7.3), .npy, .npz or .safetensors file, keeps its first c columns and checks that
they are what SDML needs: finite, d rows, and orthonormal (PᵀP = I_c), since the supervised term
compares Pᵀh with one-hot labels and only an orthonormal P keeps that comparison the one the
method is built on. A matrix that is not orthonormal to within :data:`ORTHONORMAL_TOLERANCE` is
refused rather than silently used (float32 round-off of a true orthogonal matrix is ~1e-6).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .store.files import sha256_file

ORTHONORMAL_TOLERANCE = 1e-4
"""Largest |PᵀP - I| entry accepted for the c columns used."""

_PREFERRED_KEYS = ("p", "orthp", "projection")
_FORMATS = (".mat", ".npy", ".npz", ".safetensors")


def _matrices(path: str) -> dict[str, np.ndarray]:
    """Every 2-D numeric array in the file, by key (.npy: the key "P")."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        from .data._io import load_npy

        try:
            return {"P": load_npy(path, f"projection file {path}")}
        except OSError as exc:
            raise ValueError(f"projection file {path}: not a readable .npy file ({exc.strerror or exc})") from None
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise ValueError(f"projection file {path}: not a readable safetensors file ({exc})") from None
    if ext in (".mat", ".npz"):
        from .data._io import ArrayFile

        with ArrayFile(path) as f:
            return {k: f[k] for k in f.keys()}
    raise ValueError(f"projection file {path}: unknown extension {ext!r}; expected one of {', '.join(_FORMATS)}")


def _pick(path: str, arrays: dict[str, np.ndarray], key: str | None) -> tuple[str, np.ndarray]:
    if key is not None:
        if key not in arrays:
            raise ValueError(f"projection file {path} has no key {key!r}; keys: {', '.join(arrays) or '(none)'}")
        return key, arrays[key]
    if len(arrays) == 1:  # the only array; its shape is checked by the caller
        return next(iter(arrays.items()))
    candidates = {
        k: v for k, v in arrays.items()
        if isinstance(v, np.ndarray) and v.ndim == 2 and (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer))
    }
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    preferred = [k for k in candidates if k.lower() in _PREFERRED_KEYS]
    if len(preferred) == 1:
        return preferred[0], candidates[preferred[0]]
    raise ValueError(
        f"projection file {path}: cannot tell which array is P (2-D numeric arrays: "
        f"{', '.join(candidates) or 'none'}); name it with --projection-key (projection_key in a --config file)"
    )


def load_projection(path: str | os.PathLike, d: int, c: int, key: str | None = None) -> tuple[Tensor, dict]:
    """Read P from a file and keep its first `c` columns.

    Args:
        path: .mat, .npy, .npz or .safetensors file holding a d x k matrix, k >= c.
        d: the code width (rows P must have). c: the number of classes (columns kept).
        key: the array's name in the file; default the file's only 2-D numeric array, or the
            one named P / OrthP / projection (any case).

    Returns:
        (P [d, c] float32 contiguous, source) where source = {"file": absolute path, "key",
        "sha256": of the file, "columns": c, "of_columns": k, "orthonormality_error": max
        |PᵀP - I|} for the bundle's record.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, no or several candidate arrays, wrong shape, non-finite
            entries, or columns that are not orthonormal (naming the file and the defect).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"projection file not found: {path}")
    name, matrix = _pick(path, _matrices(path), key)
    matrix = np.asarray(matrix)
    where = f"projection file {path}, key {name!r}"
    if matrix.ndim != 2 or not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise ValueError(f"{where}: expected a real d x c matrix, got shape {matrix.shape} of {matrix.dtype}")
    rows, cols = matrix.shape
    if rows != d:
        raise ValueError(f"{where}: P has {rows} rows but the code width is {d}; train with --code-dim {rows}")
    if cols < c:
        raise ValueError(f"{where}: P has {cols} columns but the dataset has {c} classes (needs at least {c})")
    p = matrix[:, :c].astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError(f"{where}: P contains NaN or Inf")
    error = float(np.abs(p.T @ p - np.eye(c)).max())
    if error > ORTHONORMAL_TOLERANCE:
        raise ValueError(
            f"{where}: the first {c} columns of P are not orthonormal (max |PᵀP - I| = {error:.3g}, "
            f"tolerance {ORTHONORMAL_TOLERANCE:g}); SDML needs PᵀP = I"
        )
    source = {
        "file": path,
        "key": name,
        "sha256": sha256_file(Path(path)),
        "columns": int(c),
        "of_columns": int(cols),
        "orthonormality_error": error,
    }
    return torch.from_numpy(p.astype(np.float32)).contiguous(), source
