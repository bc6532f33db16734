"""The SDML loss as a module holding the fixed projection P and the weight lambda."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import DSAELossOutput, dsae_loss


def label_targets(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Label rows for the loss: [B, c] in ``dtype``.

    ``y`` is either [B] integer class ids (-1 = unlabelled, giving an all-zero row) or [B, c]
    one-hot / multi-hot rows (any numeric dtype).
    """
    if y.dim() == 1 and not y.is_floating_point():
        bad = (y < -1) | (y >= num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"y: class ids must be in [-1, {num_classes}) (-1 = unlabelled), got {int(y[bad][0])}"
            )
        rows = torch.zeros(y.shape[0], num_classes, dtype=dtype, device=y.device)
        labelled = y >= 0
        rows[labelled, y[labelled]] = 1
        return rows
    if y.dim() != 2 or y.shape[1] != num_classes:
        raise ValueError(
            f"y: expected [B] class ids or [B, {num_classes}] label rows, got shape {tuple(y.shape)}"
        )
    return y.to(dtype)


class DSAELoss(nn.Module):
    """SDML objective ``lam * ||g(h) - x|| + (1 - lam) * ||P^T h - y||`` for one modality.

    Args:
        P: [d, c] fixed projection with orthonormal columns (stored as a buffer, never trained).
        lam: weight of the reconstruction term, in [0, 1] (the paper uses 0.5).
        check_finite: see :func:`sdml_ext.ops.dsae_loss`.

    ``forward(x_hat [B, D], x [B, D], h [B, d], y)`` with ``y`` as [B] class ids (-1 =
    unlabelled) or [B, c] label rows returns a :class:`~sdml_ext.ops.DSAELossOutput`. P and y are
    cast to the dtype of ``h`` (e.g. bfloat16 training with a float32 P).
    """

    def __init__(self, P: Tensor, lam: float = 0.5, check_finite: bool = True):
        super().__init__()
        if P.dim() != 2 or P.shape[1] > P.shape[0]:
            raise ValueError(f"P: must be [d, c] with c <= d, got shape {tuple(P.shape)}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam: must be in [0, 1], got {lam}")
        self.register_buffer("P", P.detach().clone())
        self.lam = float(lam)
        self.check_finite = check_finite

    @property
    def num_classes(self) -> int:
        return self.P.shape[1]

    def forward(self, x_hat: Tensor, x: Tensor, h: Tensor, y: Tensor) -> DSAELossOutput:
        targets = label_targets(y, self.num_classes, h.dtype)
        return dsae_loss(x_hat, x, h, self.P.to(h.dtype), targets, self.lam, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        d, c = self.P.shape
        return f"d={d}, c={c}, lam={self.lam}"
