"""Input preprocessing fitted on a modality's training split and stored with its network.

Real features come in wildly different scales (the embedded digits range from Fourier magnitudes
below 1 to pixel-count morphology features in the thousands); without rescaling, one large
feature dominates the reconstruction term. The transform is ``(x - shift) * scale`` per feature,
so it is two [D] float32 vectors that travel in the bundle next to the weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PREPROCESS_MODES = ("standardize", "l2", "none")
"""standardize: zero mean, unit variance per feature (train statistics); l2: each row scaled to
unit L2 norm (no fitted state); none: features used as given."""

_MIN_STD = 1e-6  # constant features get scale 1 instead of a division by ~0


class Preprocessor:
    """A fitted input transform.

    Args:
        mode: one of PREPROCESS_MODES.
        shift, scale: [D] float32 tensors (standardize) or None.

    ``__call__(x [n, D] float32) -> [n, D] float32`` on x's device.
    """

    def __init__(self, mode: str, shift: Tensor | None = None, scale: Tensor | None = None):
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess mode {mode!r}; valid: {', '.join(PREPROCESS_MODES)}")
        if (mode == "standardize") != (shift is not None and scale is not None):
            raise ValueError(f"preprocess mode {mode!r}: shift and scale are required exactly for 'standardize'")
        self.mode = mode
        self.shift = shift
        self.scale = scale

    @classmethod
    def fit(cls, mode: str, features: np.ndarray) -> Preprocessor:
        """Fit on training features: (n, D) float32 array."""
        if mode != "standardize":
            return cls(mode)
        x = np.asarray(features, dtype=np.float64)
        std = x.std(axis=0)
        scale = 1.0 / np.where(std < _MIN_STD, 1.0, std)
        return cls(
            mode,
            torch.from_numpy(x.mean(axis=0).astype(np.float32)),
            torch.from_numpy(scale.astype(np.float32)),
        )

    def __call__(self, x: Tensor) -> Tensor:
        if self.mode == "standardize":
            return (x - self.shift.to(x.device)) * self.scale.to(x.device)
        if self.mode == "l2":
            return torch.nn.functional.normalize(x, dim=1)
        return x

    def tensors(self) -> dict[str, Tensor]:
        """The fitted state for a safetensors file (empty unless standardize)."""
        if self.mode != "standardize":
            return {}
        return {"preprocess.shift": self.shift, "preprocess.scale": self.scale}

    @classmethod
    def from_tensors(cls, mode: str, tensors: dict[str, Tensor], dim: int | None = None) -> Preprocessor:
        """Inverse of :meth:`tensors`; `dim`, if given, is the feature width D the shift and scale
        must have. Raises ValueError naming a missing or misshapen tensor."""
        if mode != "standardize":
            return cls(mode)
        missing = [k for k in ("preprocess.shift", "preprocess.scale") if k not in tensors]
        if missing:
            raise ValueError(f"preprocess mode 'standardize' needs tensors {missing}, which are absent")
        for key in ("preprocess.shift", "preprocess.scale"):
            t = tensors[key]
            if t.dim() != 1 or (dim is not None and t.shape[0] != dim) or t.dtype != torch.float32:
                expected = f"[{dim}]" if dim is not None else "[D]"
                raise ValueError(f"{key} must be a float32 tensor of shape {expected}, got {t.dtype} {list(t.shape)}")
        return cls(mode, tensors["preprocess.shift"], tensors["preprocess.scale"])
