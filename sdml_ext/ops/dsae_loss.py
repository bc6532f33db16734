"""The fused SDML loss op: Python face, fake (meta) implementation and autograd.

The schemas are declared once in ``python/registration.cpp``; kernels live in ``csrc/``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels and their schemas)


class DSAELossOutput(NamedTuple):
    """What :func:`dsae_loss` returns.

    loss, rec, sup: 0-d tensors in the input dtype; ``loss = lam * rec + (1 - lam) * sup``.
    row_rec, row_sup: [B] per-row norms ||x_hat_j - x_j|| and ||P^T h_j - y_j|| (0 on unlabelled
        rows), float32 (float64 for float64 inputs); differentiable, e.g. for per-sample weights.
    n_labelled: 0-d int64, the rows whose label vector has a non-zero entry.
    """

    loss: Tensor
    rec: Tensor
    sup: Tensor
    row_rec: Tensor
    row_sup: Tensor
    n_labelled: Tensor


def dsae_loss(
    x_hat: Tensor, x: Tensor, h: Tensor, P: Tensor, y: Tensor, lam: float = 0.5, *, check_finite: bool = True
) -> DSAELossOutput:
    """The SDML objective of one modality's batch, fused in one pass over the data.

    ``loss = lam * mean_j ||x_hat_j - x_j||_2 + (1 - lam) * mean_{labelled j} ||P^T h_j - y_j||_2``
    (plain norms, not squared). ``P^T h_j`` is formed inside the kernel; neither the [B, c]
    product nor the residuals are written to memory.

    Args:
        x_hat: [B, D] decoder output.
        x: [B, D] the input features (gets a gradient too when it requires one).
        h: [B, d] encoder output (the common-space code).
        P: [d, c] fixed projection with orthonormal columns, c <= d. Never receives a gradient.
        y: [B, c] label rows (one-hot or multi-hot; an all-zero row is unlabelled and is left
            out of the supervised mean). Never receives a gradient.
        lam: weight of the reconstruction term, in [0, 1].
        check_finite: raise a ValueError naming the input that holds NaN/Inf when the loss is
            not finite. Free on CPU; on CUDA it reads one value back (a stream sync).

    All tensors share one device and one dtype: float32/float64 on CPU; float32, float64,
    float16 or bfloat16 on CUDA (accumulating in float32, float64 for float64).
    """
    for name, t in (("P", P), ("y", y)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"dsae_loss: {name} is a constant of the objective and must not require grad")
    return DSAELossOutput(*torch.ops.sdml.dsae_loss.default(x_hat, x, h, P, y, float(lam), check_finite))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("sdml::dsae_loss")
def _dsae_loss_fake(x_hat, x, h, P, y, lam, check_finite=True):
    batch = x_hat.shape[0]
    acc = _acc_dtype(x_hat.dtype)
    return (
        x_hat.new_empty(()),
        x_hat.new_empty(()),
        x_hat.new_empty(()),
        x_hat.new_empty((batch,), dtype=acc),
        x_hat.new_empty((batch,), dtype=acc),
        x_hat.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("sdml::dsae_loss_backward")
def _dsae_loss_backward_fake(
    grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup, x_hat, x, h, P, y, row_rec, row_sup,
    n_labelled, lam, need_input_grad, need_code_grad,
):
    batch = x_hat.shape[0]
    return (
        x_hat.new_empty((batch if need_input_grad else 0, x_hat.shape[1])),
        h.new_empty((batch if need_code_grad else 0, h.shape[1])),
    )


def _dsae_loss_setup_context(ctx, inputs, output):
    x_hat, x, h, P, y, lam, _check_finite = inputs
    _loss, _rec, _sup, row_rec, row_sup, n_labelled = output
    ctx.save_for_backward(x_hat, x, h, P, y, row_rec, row_sup, n_labelled)
    ctx.lam = lam
    # Unused outputs pass None, so a plain loss.backward() reads no zero-filled row gradients.
    ctx.set_materialize_grads(False)


def _dsae_loss_backward(ctx, grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup, _grad_n):
    x_hat, x, h, P, y, row_rec, row_sup, n_labelled = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[3] or needs[4]:
        raise RuntimeError("dsae_loss: P and y are constants of the objective; no gradient flows to them")
    grad_x_hat, grad_h = torch.ops.sdml.dsae_loss_backward.default(
        grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup, x_hat, x, h, P, y,
        row_rec, row_sup, n_labelled, ctx.lam, needs[0] or needs[1], needs[2],
    )
    return (
        grad_x_hat if needs[0] else None,
        -grad_x_hat if needs[1] else None,
        grad_h if needs[2] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "sdml::dsae_loss", _dsae_loss_backward, setup_context=_dsae_loss_setup_context
)
