"""The SDML networks: one deep supervised auto-encoder (DSAE) per modality and the fixed projection P.

Every modality i has its own DSAE: encoder f_i: D_i -> 1024 -> 1024 -> d and decoder
g_i: d -> 1024 -> 1024 -> D_i, ReLU after every hidden layer and none on the code or output layer.
All modalities share one fixed matrix P (d x c, orthonormal columns, never trained) that maps codes
to label space; that shared P is what makes modalities trained apart land in one common space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .store.files import tensor_checksum  # noqa: F401  (the projection's checksum; its home is the store)

DEFAULT_CODE_DIM = 512
DEFAULT_HIDDEN = (1024, 1024)


def make_projection(d: int, c: int, seed: int) -> Tensor:
    """The fixed projection P: [d, c] float32 with orthonormal columns (P^T P = I_c).

    Drawn as the Q factor of a seeded d x c standard Gaussian matrix, so it is a pure function of
    (d, c, seed) on every machine (float64 CPU generator, then cast). Raises ValueError when
    c > d: c orthonormal columns do not fit in d dimensions.
    """
    if d < 1 or c < 1:
        raise ValueError(f"projection: d and c must be >= 1, got d={d}, c={c}")
    if c > d:
        raise ValueError(
            f"projection: the number of classes c={c} exceeds the code width d={d}; P needs "
            f"c <= d orthonormal columns (choose a code width of at least {c})"
        )
    generator = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(d, c, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # QR is unique only up to column signs; fixing sign(diag(R)) > 0 makes P independent of the
    # LAPACK build.
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(torch.float32).contiguous()


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers through `widths` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DSAE(nn.Module):
    """Deep supervised auto-encoder of one modality.

    Args:
        input_dim: D, the modality's feature width.
        code_dim: d, the common-space width (512 in the paper).
        hidden: widths of the hidden layers of the encoder; the decoder mirrors them.
        normalize_code: L2-normalise the code h (the authors' code does; default on).
        normalize_output: L2-normalise the reconstruction (the authors' code does, the paper's
            equations do not; default on).

    ``forward(x [B, D])`` returns ``(h [B, d], x_hat [B, D])``; ``encode(x)`` returns h only.
    float32 parameters, inputs of the parameters' dtype and device.
    """

    def __init__(
        self,
        input_dim: int,
        code_dim: int = DEFAULT_CODE_DIM,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        *,
        normalize_code: bool = True,
        normalize_output: bool = True,
    ):
        super().__init__()
        hidden = [int(w) for w in hidden]
        for name, value in (("input_dim", input_dim), ("code_dim", code_dim), *(("hidden", w) for w in hidden)):
            if int(value) < 1:
                raise ValueError(f"DSAE: {name} must be >= 1, got {value}")
        self.input_dim = int(input_dim)
        self.code_dim = int(code_dim)
        self.hidden = tuple(hidden)
        self.normalize_code = bool(normalize_code)
        self.normalize_output = bool(normalize_output)
        self.encoder = _mlp([self.input_dim, *hidden, self.code_dim])
        self.decoder = _mlp([self.code_dim, *reversed(hidden), self.input_dim])

    def encode(self, x: Tensor) -> Tensor:
        """Common-space codes h: [B, D] -> [B, d]."""
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"DSAE.encode: expected inputs of shape [B, {self.input_dim}], got {tuple(x.shape)}"
            )
        h = self.encoder(x)
        return F.normalize(h, dim=1) if self.normalize_code else h

    def decode(self, h: Tensor) -> Tensor:
        """Reconstructions x_hat: [B, d] -> [B, D]."""
        x_hat = self.decoder(h)
        return F.normalize(x_hat, dim=1) if self.normalize_output else x_hat

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encode(x)
        return h, self.decode(h)

    def options(self) -> dict:
        """The constructor arguments, JSON-serialisable: ``DSAE(**model.options())`` rebuilds it."""
        return {
            "input_dim": self.input_dim,
            "code_dim": self.code_dim,
            "hidden": list(self.hidden),
            "normalize_code": self.normalize_code,
            "normalize_output": self.normalize_output,
        }

    def extra_repr(self) -> str:
        return (
            f"D={self.input_dim}, d={self.code_dim}, hidden={list(self.hidden)}, "
            f"normalize_code={self.normalize_code}, normalize_output={self.normalize_output}"
        )
