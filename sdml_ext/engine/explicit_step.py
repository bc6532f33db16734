"""The CPU training step without autograd: the DSAE's forward and a hand-written backward into
preallocated buffers, and one fused Adam pass over flat parameter / gradient / moment buffers.

Why: at batch 100 the step's GEMMs are only part of an autograd step on the CPU. The rest is the
graph's bookkeeping and many small passes over the activations (bias broadcasts, ReLU forward and
backward, bias-gradient sums, F.normalize's five ops forward and backward, one Adam launch per
parameter). The network is a fixed chain (Linear, ReLU, ..., Linear, normalise; twice), so its
backward is known in advance and is written out here, once.

What stays the same as the autograd step (``ModalityTrainer`` with ``explicit=False``, and the CUDA
paths): the loss (the fused op and its backward), the gradients up to float rounding (GEMMs
with other operand orders, the code's two gradient contributions added inside one GEMM), and
Adam's arithmetic exactly: ``torch._fused_adam_``, the kernel ``torch.optim.Adam(fused=True)``
runs per parameter, here run once over all parameters laid end to end (elementwise, so the same
bits as per parameter, up to the scalar tail of a parameter whose size is no multiple of the vector
width). Parameters keep their names and shapes: they become views into one flat buffer; the
optimizer keeps its per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``) as views into the
flat moments, so checkpoints, ``state_dict`` and restores see what they always saw.

The normalisation's backward: ``F.normalize(v) = v / max(||v||, eps)``; with ``u`` its output and
``n = max(||v||, eps)``, ``dv = (g - u (u . g)) / n`` where ``||v|| >= eps`` and ``dv = g / eps`` where
the norm is below eps (clamp_min passes no gradient there), exactly autograd's derivative.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_NORMALIZE_EPS = 1e-12  # F.normalize's default, which DSAE uses


def dsae_loss_and_grads(x_hat: Tensor, x: Tensor, h: Tensor, P: Tensor, y: Tensor, lam: float, check_finite: bool,
                        one: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rec, sup, grad of loss w.r.t. x_hat, w.r.t. h) of one batch: the fused loss op and
    its backward op with d loss = 1 (``one``: a 0-d tensor holding 1). The one place the step
    meets the loss."""
    loss, rec, sup, row_rec, row_sup, n_labelled = torch.ops.sdml.dsae_loss.default(
        x_hat, x, h, P, y, lam, check_finite)
    grad_x_hat, grad_h = torch.ops.sdml.dsae_loss_backward.default(
        one, None, None, None, None, x_hat, x, h, P, y, row_rec, row_sup, n_labelled, lam, True, True)
    return loss, rec, sup, grad_x_hat, grad_h


class _Dense:
    """One Linear layer of the chain: detached views of its weight [out, in] and bias [out] and of
    their gradients, the buffer of its output [B, out] and of its output's gradient."""

    def __init__(self, linear: nn.Linear, grad_w: Tensor, grad_b: Tensor, batch: int, relu: bool):
        self.w, self.b = linear.weight.detach(), linear.bias.detach()
        self.grad_w, self.grad_b = grad_w, grad_b
        self.relu = relu
        n_out = self.w.shape[0]
        self.out = self.w.new_empty((batch, n_out))
        self.grad_out = self.w.new_empty((batch, n_out))


class _Normalized:
    """The buffers of one row normalisation: output [B, w], norms clamped to eps [B, 1], where the
    norm reached eps [B, 1] (as 0/1), and a scratch [B, 1]."""

    def __init__(self, like: Tensor):
        batch, width = like.shape
        self.out = like.new_empty((batch, width))
        self.norm = like.new_empty((batch, 1))
        self.passes = like.new_empty((batch, 1))
        self.dot = like.new_empty((batch, 1))

    def forward(self, v: Tensor) -> Tensor:
        torch.linalg.vector_norm(v, dim=1, keepdim=True, out=self.norm)
        torch.ge(self.norm, _NORMALIZE_EPS, out=self.passes)
        self.norm.clamp_min_(_NORMALIZE_EPS)
        return torch.div(v, self.norm, out=self.out)

    def backward(self, g: Tensor, out: Tensor) -> Tensor:
        """d v into `out` from the gradient g of the output (out may be g)."""
        torch.sum(g * self.out, dim=1, keepdim=True, out=self.dot)
        self.dot.mul_(self.passes)
        torch.addcmul(g, self.out, self.dot, value=-1, out=out)
        return out.div_(self.norm)


class ExplicitStep:
    """The autograd-free training step of one DSAE on the CPU, bound to a model, its Adam and
    its loss (see the module's docstring).

    Args:
        model: the DSAE (float32 or float64, on the CPU); its parameters are moved into one flat
            buffer (same names, shapes and values; ``.grad`` becomes a view of the flat gradient).
        optimizer: the model's ``torch.optim.Adam`` over ``model.parameters()`` in order, one
            parameter group; its hyper-parameters are read from it, its state is kept as views
            into the flat moments (adopted from whatever state it holds at the first step after
            construction or :meth:`invalidate`).
        loss: the DSAELoss (P, lam, check_finite).
        batch: rows of every batch.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, loss, batch: int):
        params = list(model.parameters())
        if len(optimizer.param_groups) != 1 or list(optimizer.param_groups[0]["params"]) != params:
            raise ValueError("explicit step: the optimizer must hold the model's parameters, in order, in one group")
        group = optimizer.param_groups[0]
        if group["amsgrad"] or group["maximize"] or group["weight_decay"] != 0 or group.get("decoupled_weight_decay"):
            raise ValueError("explicit step: implements plain Adam (no amsgrad, maximize or weight decay)")
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.params = params
        total = sum(p.numel() for p in params)
        like = params[0].detach()
        self.flat = like.new_empty(total)
        self.grad = like.new_zeros(total)
        self.exp_avg = like.new_zeros(total)
        self.exp_avg_sq = like.new_zeros(total)
        self.steps = torch.zeros(len(params), dtype=torch.float32)  # torch's fused Adam keeps float32 steps
        self._views: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = self.flat[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                grad = self.grad[offset : offset + n].view_as(p)
                p.grad = grad
                self._views.append((view, grad, self.exp_avg[offset : offset + n].view_as(p),
                                    self.exp_avg_sq[offset : offset + n].view_as(p)))
                offset += n
        self._bound = False
        grads = {id(p): v[1] for p, v in zip(params, self._views)}
        self.encoder = self._chain(model.encoder, grads, batch)
        self.decoder = self._chain(model.decoder, grads, batch)
        self.normalize_code = model.normalize_code
        self.normalize_output = model.normalize_output
        self.code_norm = _Normalized(self.encoder[-1].out) if self.normalize_code else None
        self.output_norm = _Normalized(self.decoder[-1].out) if self.normalize_output else None
        self.grad_code = like.new_empty(self.encoder[-1].out.shape)
        self.one = torch.ones((), dtype=like.dtype)

    @staticmethod
    def _chain(sequential: nn.Sequential, grads: dict, batch: int) -> list[_Dense]:
        layers = list(sequential)
        dense = []
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                dense.append(_Dense(layer, grads[id(layer.weight)], grads[id(layer.bias)], batch, relu))
            elif not isinstance(layer, nn.ReLU):
                raise ValueError(f"explicit step: unexpected layer {type(layer).__name__}")
        return dense

    # -- the optimizer's state as views into the flat moments -----------------------------------

    def invalidate(self) -> None:
        """The optimizer's state was replaced (a restore): adopt it again before the next step."""
        self._bound = False

    @torch.no_grad()
    def _bind(self) -> None:
        """Copy whatever state the optimizer holds into the flat moments (zeros where it holds
        none) and make its per-parameter state views of them."""
        state = self.optimizer.state
        for i, (p, (_, _, m, v)) in enumerate(zip(self.params, self._views)):
            held = state.get(p) or {}
            if held:
                m.copy_(held["exp_avg"])
                v.copy_(held["exp_avg_sq"])
                self.steps[i] = held["step"]
            else:
                m.zero_()
                v.zero_()
                self.steps[i] = 0
            state[p] = {"step": self.steps[i], "exp_avg": m, "exp_avg_sq": v}
        if not bool((self.steps == self.steps[0]).all()):
            raise ValueError("explicit step: the optimizer's parameters have taken different numbers of steps")
        self._bound = True

    # -- the step --------------------------------------------------------------------------------

    @staticmethod
    def _forward_chain(chain: list[_Dense], a: Tensor) -> Tensor:
        for layer in chain:
            torch.addmm(layer.b, a, layer.w.t(), out=layer.out)
            if layer.relu:
                layer.out.relu_()
            a = layer.out
        return a

    @staticmethod
    def _backward_chain(chain: list[_Dense], inputs: list[Tensor], grad_in: Tensor | None,
                        extra: Tensor | None = None) -> None:
        """Backward through `chain` (whose last layer's grad_out is set): weight and bias
        gradients of every layer, and the gradient of the chain's input into grad_in (+ extra)
        unless grad_in is None."""
        for k in range(len(chain) - 1, -1, -1):
            layer = chain[k]
            g = layer.grad_out
            torch.mm(g.t(), inputs[k], out=layer.grad_w)
            torch.sum(g, dim=0, out=layer.grad_b)
            if k > 0:
                below = chain[k - 1]
                torch.mm(g, layer.w, out=below.grad_out)
                if below.relu:
                    torch.ops.aten.threshold_backward.grad_input(below.grad_out, below.out, 0, grad_input=below.grad_out)
            elif grad_in is not None:
                if extra is not None:
                    torch.addmm(extra, g, layer.w, out=grad_in)
                else:
                    torch.mm(g, layer.w, out=grad_in)

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One Adam step on the batch (x [B, D], y [B, c] label rows); returns (loss, rec, sup)."""
        if not self._bound:
            self._bind()
        enc, dec = self.encoder, self.decoder
        code = self._forward_chain(enc, x)
        h = self.code_norm.forward(code) if self.code_norm is not None else code
        out = self._forward_chain(dec, h)
        x_hat = self.output_norm.forward(out) if self.output_norm is not None else out
        loss_fn = self.loss
        loss, rec, sup, grad_x_hat, grad_h = dsae_loss_and_grads(
            x_hat, x, h, loss_fn.P, y, loss_fn.lam, loss_fn.check_finite, self.one)
        last = dec[-1]
        if self.output_norm is not None:
            self.output_norm.backward(grad_x_hat, last.grad_out)
        else:
            last.grad_out.copy_(grad_x_hat)
        self._backward_chain(dec, [h] + [layer.out for layer in dec[:-1]], self.grad_code, extra=grad_h)
        top = enc[-1]
        if self.code_norm is not None:
            self.code_norm.backward(self.grad_code, top.grad_out)
        else:
            top.grad_out.copy_(self.grad_code)
        self._backward_chain(enc, [x] + [layer.out for layer in enc[:-1]], None)
        self._adam()
        return loss, rec, sup

    def _adam(self) -> None:
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        self.steps.add_(1)
        torch._fused_adam_(
            [self.flat], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps[0]],
            lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), weight_decay=0.0,
            eps=float(group["eps"]), amsgrad=False, maximize=False)
