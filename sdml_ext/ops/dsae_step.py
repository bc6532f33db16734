"""The DSAE training-step kernels: Python face and fake (meta) implementations.

CPU kernels of the autograd-free training step (:mod:`sdml_ext.engine.explicit_step`); each
writes into buffers it is given and returns nothing, and none has autograd (the step is its own
backward). Schemas in ``csrc/registration/dsae_step.cpp``, kernels in ``csrc/cpu/dsae_step.cpp``,
argument checks in ``csrc/dsae_step_checks.cpp`` (the fakes below run the same checks, with the same
messages). All operands: contiguous float32 or float64 tensors of one dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels and their schemas)


def dense_bias_act(out: Tensor, bias: Tensor, relu: bool) -> None:
    """``out = act(out + bias)`` in place (out [B, n], bias [n]); act is ReLU or the identity."""
    torch.ops.sdml.dense_bias_act.default(out, bias, relu)


def dense_forward(input: Tensor, weight: Tensor, bias: Tensor, relu: bool, out: Tensor) -> None:
    """A Linear layer (and its ReLU) into ``out`` [B, n_out]: ``act(input @ weight.T + bias)`` for
    input [B, n_in], weight [n_out, n_in], bias [n_out]; in fixed column tiles, each one
    single-threaded GEMM (the result does not depend on the thread count)."""
    torch.ops.sdml.dense_forward.default(input, weight, bias, relu, out)


def dense_input_grad(grad_out: Tensor, weight: Tensor, grad_input: Tensor, accumulate: bool = False) -> None:
    """A Linear layer's input gradient ``grad_out @ weight`` (grad_out [B, n_out], weight
    [n_out, n_in]) written into ``grad_input`` [B, n_in], or added to it when ``accumulate``."""
    torch.ops.sdml.dense_input_grad.default(grad_out, weight, grad_input, accumulate)


def normalize_rows(v: Tensor, eps: float, out: Tensor, norm: Tensor) -> None:
    """``F.normalize(v, dim=1, eps=eps)`` into ``out`` [B, n]; ``norm`` [B] gets ``||v_j||``
    (unclamped: the backward reads whether the clamp was active)."""
    torch.ops.sdml.normalize_rows.default(v, eps, out, norm)


def normalize_rows_backward(grad: Tensor, out: Tensor, norm: Tensor, eps: float, grad_input: Tensor,
                            column_sums: Tensor | None = None) -> None:
    """The gradient of :func:`normalize_rows`' input from ``grad`` (of its output ``out``) into
    ``grad_input``: ``(g - u (u . g)) / ||v||`` where ``||v|| >= eps``, ``g / eps`` where not.
    ``column_sums`` [n], when given, gets the column sums of grad_input (a bias gradient)."""
    torch.ops.sdml.normalize_rows_backward.default(grad, out, norm, eps, grad_input, column_sums)


def dense_grad(grad: Tensor, activation: Tensor | None, grad_bias: Tensor) -> None:
    """A dense layer's pre-activation gradient in place: ``grad[activation <= 0] = 0`` when the
    layer has a ReLU (``activation`` its output); ``grad_bias`` [n] gets grad's column sums."""
    torch.ops.sdml.dense_grad.default(grad, activation, grad_bias)


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                beta2: float, eps: float, step: int) -> None:
    """One Adam update in place, in torch's fused Adam arithmetic; ``step`` counts this update
    (1 for the first)."""
    torch.ops.sdml.adam_update.default(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, float(step))


def linear_weight_grad_adam(grad_out: Tensor, input: Tensor, weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                            *, lr: float, beta1: float, beta2: float, eps: float, step: int,
                            grad_weight: Tensor | None = None) -> None:
    """A Linear layer's weight [n_out, n_in] updated by Adam from its gradient ``grad_out^T input``
    (grad_out [B, n_out], input [B, n_in]), formed and consumed tile by tile; ``grad_weight``,
    when given, receives the gradient too."""
    torch.ops.sdml.linear_weight_grad_adam.default(
        grad_out, input, weight, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, float(step), grad_weight)


# ---- fake implementations: csrc/dsae_step_checks.cpp's checks, same wording ----------------------

_INT_MAX = 2**31 - 1


def _check_operand(op, name, t, ref, ref_name, shape):
    torch._check_type(t.dtype in (torch.float32, torch.float64),
                      lambda: f"{op}: {name} must be float32 or float64, got {t.dtype}")
    torch._check_type(t.dtype == ref.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype "
                                                    f"{ref.dtype}; cast them to one floating dtype")
    torch._check_value(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but {ref_name} is on "
                                                       f"{ref.device}; move them to one device")
    torch._check_value(tuple(t.shape) == tuple(shape),
                       lambda: f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    torch._check_value(t.is_contiguous(), lambda: f"{op}: {name} must be contiguous")


def _check_rows(op, name, t):
    torch._check_value(t.dim() == 2, lambda: f"{op}: {name} must be a 2-D tensor, got shape {list(t.shape)}")
    torch._check_value(t.shape[0] > 0 and t.shape[1] > 0,
                       lambda: f"{op}: {name} must have rows and columns, got shape {list(t.shape)}")
    _check_operand(op, name, t, t, name, t.shape)
    return t.shape[0], t.shape[1]


def _check_eps(op, eps):
    torch._check_value(eps >= 0 and math.isfinite(eps), lambda: f"{op}: eps must be finite and >= 0, got {eps}")


def _check_adam_hyper(op, lr, beta1, beta2, eps, step):
    torch._check_value(lr > 0 and math.isfinite(lr), lambda: f"{op}: lr must be positive and finite, got {lr}")
    torch._check_value(0 <= beta1 < 1, lambda: f"{op}: beta1 must be in [0, 1), got {beta1}")
    torch._check_value(0 <= beta2 < 1, lambda: f"{op}: beta2 must be in [0, 1), got {beta2}")
    _check_eps(op, eps)
    torch._check_value(math.isfinite(step) and step >= 1 and step == math.floor(step),
                       lambda: f"{op}: step must be a whole number >= 1 (this update's count), got {step}")


@torch.library.register_fake("sdml::dense_bias_act")
def _dense_bias_act_fake(out, bias, relu):
    _, n = _check_rows("dense_bias_act", "out", out)
    _check_operand("dense_bias_act", "bias", bias, out, "out", (n,))


def _check_sizes(op, **shapes):
    torch._check_value(all(n <= _INT_MAX for shape in shapes.values() for n in shape),
                       lambda: f"{op}: sizes must fit the BLAS's 32-bit integers, got "
                               + " and ".join(f"{name} {list(shape)}" for name, shape in shapes.items()))


@torch.library.register_fake("sdml::dense_forward")
def _dense_forward_fake(input, weight, bias, relu, out):
    op = "dense_forward"
    B, n_in = _check_rows(op, "input", input)
    torch._check_value(weight.dim() == 2 and weight.shape[0] > 0 and weight.shape[1] == n_in,
                       lambda: f"{op}: weight must be [n_out, n_in] with n_in = {n_in} (input's columns) and "
                               f"n_out >= 1, got shape {list(weight.shape)}")
    _check_operand(op, "weight", weight, input, "input", weight.shape)
    n_out = weight.shape[0]
    _check_operand(op, "bias", bias, input, "input", (n_out,))
    _check_operand(op, "out", out, input, "input", (B, n_out))
    _check_sizes(op, input=input.shape, weight=weight.shape)


@torch.library.register_fake("sdml::dense_input_grad")
def _dense_input_grad_fake(grad_out, weight, grad_input, accumulate):
    op = "dense_input_grad"
    B, n_out = _check_rows(op, "grad_out", grad_out)
    torch._check_value(weight.dim() == 2 and weight.shape[0] == n_out and weight.shape[1] > 0,
                       lambda: f"{op}: weight must be [n_out, n_in] with n_out = {n_out} (grad_out's columns) and "
                               f"n_in >= 1, got shape {list(weight.shape)}")
    _check_operand(op, "weight", weight, grad_out, "grad_out", weight.shape)
    _check_operand(op, "grad_input", grad_input, grad_out, "grad_out", (B, weight.shape[1]))
    _check_sizes(op, grad_out=grad_out.shape, weight=weight.shape)


@torch.library.register_fake("sdml::normalize_rows")
def _normalize_rows_fake(v, eps, out, norm):
    op = "normalize_rows"
    B, n = _check_rows(op, "v", v)
    _check_eps(op, eps)
    _check_operand(op, "out", out, v, "v", (B, n))
    _check_operand(op, "norm", norm, v, "v", (B,))


@torch.library.register_fake("sdml::normalize_rows_backward")
def _normalize_rows_backward_fake(grad, out, norm, eps, grad_input, column_sums=None):
    op = "normalize_rows_backward"
    B, n = _check_rows(op, "grad", grad)
    _check_eps(op, eps)
    _check_operand(op, "out", out, grad, "grad", (B, n))
    _check_operand(op, "norm", norm, grad, "grad", (B,))
    _check_operand(op, "grad_input", grad_input, grad, "grad", (B, n))
    if column_sums is not None:
        _check_operand(op, "column_sums", column_sums, grad, "grad", (n,))


@torch.library.register_fake("sdml::dense_grad")
def _dense_grad_fake(grad, activation, grad_bias):
    op = "dense_grad"
    B, n = _check_rows(op, "grad", grad)
    if activation is not None:
        _check_operand(op, "activation", activation, grad, "grad", (B, n))
    _check_operand(op, "grad_bias", grad_bias, grad, "grad", (n,))


@torch.library.register_fake("sdml::adam_update")
def _adam_update_fake(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step):
    op = "adam_update"
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_operand(op, name, t, param, "param", param.shape)
    _check_adam_hyper(op, lr, beta1, beta2, eps, step)


@torch.library.register_fake("sdml::linear_weight_grad_adam")
def _linear_weight_grad_adam_fake(grad_out, input, weight, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step,
                                  grad_weight=None):
    op = "linear_weight_grad_adam"
    B, n_out = _check_rows(op, "grad_out", grad_out)
    torch._check_value(
        input.dim() == 2 and input.shape[0] == B and input.shape[1] > 0,
        lambda: f"{op}: input must be [B, n_in] with B = grad_out.size(0) = {B} and n_in >= 1, got shape "
                f"{list(input.shape)}")
    n_in = input.shape[1]
    _check_operand(op, "input", input, grad_out, "grad_out", (B, n_in))
    for name, t in (("weight", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_operand(op, name, t, grad_out, "grad_out", (n_out, n_in))
    if grad_weight is not None:
        _check_operand(op, "grad_weight", grad_weight, grad_out, "grad_out", (n_out, n_in))
    torch._check_value(max(B, n_out, n_in) <= _INT_MAX,
                       lambda: f"{op}: sizes must fit the BLAS's 32-bit integers, got grad_out {list(grad_out.shape)} "
                               f"and input {list(input.shape)}")
    _check_adam_hyper(op, lr, beta1, beta2, eps, step)
