"""The fused SDML loss op: Python face, fake (meta) implementation and autograd.

The schemas are declared once in ``csrc/registration/dsae_loss.cpp``; kernels live in ``csrc/``.
The fake implementations run the same argument checks as the kernels (``csrc/dsae_loss_checks.cpp``,
same messages), so a bad call fails under ``torch.compile`` tracing and ``FakeTensorMode`` too, and a
meta tensor mixed with real ones is refused instead of returning uninitialized memory.

Autograd: when autograd will need them, :func:`dsae_loss` asks the kernel for the gradients of the
loss at unit upstream gradient (``need_input_grad`` / ``need_code_grad``), formed while each row is
in cache. A backward whose upstream gradient is on the loss alone (``loss.backward()``) returns them
times ``grad_loss`` (in place; nothing to do when it is 1), so the pair reads ``x_hat`` and ``x``
once. Upstream gradients on the other outputs (``rec``, ``sup``, the per-row norms) run the backward
op, which reads them again.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _extension  # loads the kernels and their schemas


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

    Raises:
        ValueError / TypeError naming the argument for a bad shape, dtype, device or ``lam``, also
        while ``torch.compile`` traces the call; ValueError naming the input that holds NaN/Inf.
    """
    for name, t in (("P", P), ("y", y)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"dsae_loss: {name} is a constant of the objective and must not require grad")
    # When autograd will need them, the kernel also forms the gradients at unit upstream gradient
    # while each row is in cache; the backward of a plain loss.backward() then only hands them on.
    grad = torch.is_grad_enabled()
    need_input_grad = grad and any(isinstance(t, Tensor) and t.requires_grad for t in (x_hat, x))
    need_code_grad = grad and isinstance(h, Tensor) and h.requires_grad
    out = torch.ops.sdml.dsae_loss.default(
        x_hat, x, h, P, y, float(lam), check_finite, need_input_grad, need_code_grad
    )
    if not torch.compiler.is_compiling():
        for g in out[6:]:  # dropped here: nobody else can see them, so the backward may scale them in place
            g._sdml_private = True
    return DSAELossOutput(*out[:6])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The SDML_CHECK_* macros of csrc/include/sdml/checks.h, for fake tensors (same wording).
def _check_floating(op, name, t):
    torch._check_type(t.dtype.is_floating_point, lambda: f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_shape(op, name, t, shape):
    torch._check_value(t.shape == tuple(shape), lambda: f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_device(op, name, t, x_hat):
    torch._check_value(
        t.device == x_hat.device,
        lambda: f"{op}: {name} is on {t.device} but x_hat is on {x_hat.device}; move them to one device",
    )


def _check_args(x_hat, x, h, P, y, lam):
    """The checks of ``check_dsae_loss_args`` (C++), for fake tensors; returns (B, D, d, c)."""
    op = "dsae_loss"
    named = (("x_hat", x_hat), ("x", x), ("h", h), ("P", P), ("y", y))
    for name, t in named:
        _check_floating(op, name, t)
    for name, t in (("x_hat", x_hat), ("h", h), ("P", P)):
        torch._check_value(t.dim() == 2, lambda: f"{op}: {name} must be a 2-D tensor, got shape {list(t.shape)}")
    B, D, d, c = x_hat.shape[0], x_hat.shape[1], h.shape[1], P.shape[1]
    torch._check_value(B > 0, lambda: f"{op}: x_hat has no rows (an empty batch has no loss)")
    torch._check_value(D > 0, lambda: f"{op}: x_hat has no columns")
    _check_shape(op, "x", x, (B, D))
    torch._check_value(
        h.shape[0] == B, lambda: f"{op}: h must have one row per row of x_hat ({B}), got shape {list(h.shape)}"
    )
    torch._check_value(d > 0, lambda: f"{op}: h has no columns")
    torch._check_value(
        P.shape[0] == d, lambda: f"{op}: P must be d x c with d = h.size(1) = {d}, got shape {list(P.shape)}"
    )
    torch._check_value(c > 0, lambda: f"{op}: P has no columns (no classes)")
    torch._check_value(
        c <= d, lambda: f"{op}: P has c = {c} columns but d = {d} rows; SDML needs c <= d (P has orthonormal columns)"
    )
    _check_shape(op, "y", y, (B, c))
    for name, t in named[1:]:
        torch._check_type(
            t.dtype == x_hat.dtype,
            lambda: f"{op}: {name} has dtype {t.dtype} but x_hat has dtype {x_hat.dtype}; cast them to one floating dtype",
        )
    for name, t in named[1:]:
        _check_device(op, name, t, x_hat)
    torch._check_value(0.0 <= lam <= 1.0, lambda: f"{op}: lam must be in [0, 1], got {lam}")
    if x_hat.device.type == "cpu":
        torch._check_type(
            x_hat.dtype in (torch.float32, torch.float64),
            lambda: f"{op}: on CPU x_hat must be float32 or float64, got {x_hat.dtype}",
        )
    elif x_hat.device.type == "cuda" and all(isinstance(n, int) for n in (B, D, d, c)):
        # The CUDA kernels' launch limits, from the C++ that enforces them (symbolic sizes are
        # left to the kernel: reading them here would specialize the compiled graph).
        _extension._C.check_dsae_loss_cuda_limits(B, D, d, c)
    return B, D, d, c


@torch.library.register_fake("sdml::dsae_loss")
def _dsae_loss_fake(x_hat, x, h, P, y, lam, check_finite=True, need_input_grad=False, need_code_grad=False):
    batch, dim, code, _ = _check_args(x_hat, x, h, P, y, lam)
    acc = _acc_dtype(x_hat.dtype)
    return (
        x_hat.new_empty(()),
        x_hat.new_empty(()),
        x_hat.new_empty(()),
        x_hat.new_empty((batch,), dtype=acc),
        x_hat.new_empty((batch,), dtype=acc),
        x_hat.new_empty((), dtype=torch.int64),
        *_empty_grads(x_hat, h, batch, dim, code, need_input_grad, need_code_grad),
    )


def _empty_grads(x_hat, h, batch, dim, code, need_input_grad, need_code_grad):
    """grad_x_hat [B or 0, D] and grad_h [B or 0, d], as the kernels allocate them."""
    return (
        x_hat.new_empty((batch if need_input_grad else 0, dim)),
        h.new_empty((batch if need_code_grad else 0, code)),
    )


def _check_backward_args(grads, x_hat, row_rec, row_sup, n_labelled, batch):
    """The checks of ``check_dsae_loss_backward_args`` (C++) beyond the forward's."""
    op = "dsae_loss_backward"
    acc = _acc_dtype(x_hat.dtype)
    for name, t, shape, dtype in (
        ("row_rec", row_rec, (batch,), acc),
        ("row_sup", row_sup, (batch,), acc),
        ("n_labelled", n_labelled, (), torch.int64),
    ):
        _check_device(op, name, t, x_hat)
        _check_shape(op, name, t, shape)
        torch._check_type(t.dtype == dtype, lambda: f"{op}: {name} must have dtype {dtype}, got {t.dtype}")
    names = ("grad_loss", "grad_rec", "grad_sup", "grad_row_rec", "grad_row_sup")
    for name, g, shape in zip(names, grads, ((),) * 3 + ((batch,),) * 2):
        if g is not None:
            _check_floating(op, name, g)
            _check_device(op, name, g, x_hat)
            _check_shape(op, name, g, shape)


@torch.library.register_fake("sdml::dsae_loss_backward")
def _dsae_loss_backward_fake(
    grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup, x_hat, x, h, P, y, row_rec, row_sup,
    n_labelled, lam, need_input_grad, need_code_grad,
):
    batch, dim, code, _ = _check_args(x_hat, x, h, P, y, lam)
    grads = (grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup)
    _check_backward_args(grads, x_hat, row_rec, row_sup, n_labelled, batch)
    return _empty_grads(x_hat, h, batch, dim, code, need_input_grad, need_code_grad)


def _dsae_loss_setup_context(ctx, inputs, output):
    x_hat, x, h, P, y, lam, _check_finite, need_input_grad, need_code_grad = inputs
    _loss, _rec, _sup, row_rec, row_sup, n_labelled, grad_x_hat, grad_h = output
    ctx.save_for_backward(x_hat, x, h, P, y, row_rec, row_sup, n_labelled)
    ctx.lam = lam
    ctx.mark_non_differentiable(grad_x_hat, grad_h)
    # The gradients the forward formed at unit upstream gradient (None where not asked for). Kept
    # as attributes, not saved tensors: the first backward takes them, so the tensor it returns
    # has no other owner (autograd adopts it as x_hat.grad without a copy, and scaling it in
    # place touches nothing anyone else holds).
    ctx.forward_grads = (grad_x_hat if need_input_grad else None, grad_h if need_code_grad else None)
    # Unused outputs pass None, so a plain loss.backward() reads no zero-filled row gradients.
    ctx.set_materialize_grads(False)


def _eager(t: Tensor) -> bool:
    """A plain tensor outside any tracing or functorch transform: its value can be read and it can
    be written in place."""
    return (
        type(t) is Tensor
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _is_one(grad_loss: Tensor) -> bool:
    """Whether grad_loss is exactly 1, where that is free to know: a CPU value read eagerly. On CUDA
    reading it would sync the stream (and break CUDA-graph capture), and a traced value has none:
    there the gradients are always scaled (by 1 in the usual case, which keeps every bit)."""
    return grad_loss.device.type == "cpu" and _eager(grad_loss) and grad_loss.item() == 1


def _scaled(g: Tensor | None, grad_loss: Tensor) -> Tensor | None:
    """g * grad_loss; in place when g is this backward's own eager tensor (no new buffer). The
    forward's gradients are that only when the Python face asked for them (it marks them private:
    a direct op call may still hold its outputs)."""
    if g is None or _is_one(grad_loss):
        return g
    private = getattr(g, "_sdml_private", False) and _eager(g) and _eager(grad_loss)
    return g.mul_(grad_loss) if private else g * grad_loss


def _unit_grads(ctx, forward_grads, grad_loss, need_input, need_code):
    """The gradients of the loss for an upstream gradient of 1: the forward's, when it formed all
    that are needed (the first backward after it); else the backward kernel's at grad_loss = 1."""
    if forward_grads is not None:
        grad_x_hat, grad_h = forward_grads
        if (grad_x_hat is not None or not need_input) and (grad_h is not None or not need_code):
            return grad_x_hat, grad_h
    x_hat, x, h, P, y, row_rec, row_sup, n_labelled = ctx.saved_tensors
    grads = torch.ops.sdml.dsae_loss_backward.default(
        torch.ones_like(grad_loss), None, None, None, None, x_hat, x, h, P, y,
        row_rec, row_sup, n_labelled, ctx.lam, need_input, need_code,
    )
    if _eager(grad_loss):
        for g in grads:  # fresh from the kernel: this backward's own
            g._sdml_private = True
    return grads


def _dsae_loss_backward(ctx, grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup, _grad_n, _ggx, _ggh):
    needs = ctx.needs_input_grad
    if needs[3] or needs[4]:
        raise RuntimeError("dsae_loss: P and y are constants of the objective; no gradient flows to them")
    need_input, need_code = needs[0] or needs[1], needs[2]
    forward_grads, ctx.forward_grads = ctx.forward_grads, None  # taken (or dropped) by the first backward
    if grad_loss is not None and all(g is None for g in (grad_rec, grad_sup, grad_row_rec, grad_row_sup)):
        # An upstream gradient on the loss alone (the usual loss.backward()): the unit gradient
        # times grad_loss, whichever pass formed it, so a second backward through a retained graph
        # gives the same bits as the first.
        unit = _unit_grads(ctx, forward_grads, grad_loss, need_input, need_code)
        grad_x_hat, grad_h = (_scaled(g, grad_loss) for g in unit)
    else:
        x_hat, x, h, P, y, row_rec, row_sup, n_labelled = ctx.saved_tensors
        grad_x_hat, grad_h = torch.ops.sdml.dsae_loss_backward.default(
            grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup, x_hat, x, h, P, y,
            row_rec, row_sup, n_labelled, ctx.lam, need_input, need_code,
        )
    return (
        grad_x_hat if needs[0] else None,
        -grad_x_hat if needs[1] else None,
        grad_h if needs[2] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "sdml::dsae_loss", _dsae_loss_backward, setup_context=_dsae_loss_setup_context
)
