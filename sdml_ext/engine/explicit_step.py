"""The CPU training step without autograd: the DSAE's forward and its backward written out by
hand into preallocated buffers, with Adam fused into the weight-gradient GEMMs.

Why: at batch 100 an autograd step on the CPU spends much of its time outside the GEMMs: the
graph's bookkeeping and many small passes over the activations (bias broadcasts, ReLU forward
and backward, bias-gradient sums, F.normalize's ops forward and backward), one Adam launch per
parameter over gradients written to memory and read back. The network is a fixed chain
(Linear, ReLU, ..., Linear, normalise; twice), so its backward is known in advance and is
written out here once, on the kernels of :mod:`sdml_ext.ops.dsae_step`:

- forward, per layer: ``dense_forward``: the GEMM into the layer's buffer in fixed column tiles,
  each a single-threaded GEMM followed by bias and ReLU while the tile is in cache (at batch ~100
  a threaded BLAS call leaves cores idle; see csrc/cpu/dsae_step.cpp); the code and the output
  rows normalised in one pass each;
- the loss: :func:`dsae_loss_and_grads`, the fused loss op forming its gradients as it goes;
- backward, per layer from the top: the input's gradient with the layer's weights (before they
  change; ``dense_input_grad``, column tiles again), then the weights' gradient and Adam in one sweep
  (``linear_weight_grad_adam``: tile by tile, the gradient never in memory), then the ReLU mask
  of the layer below and its bias gradient in one pass (``dense_grad``; under a normalisation,
  its backward sums the bias gradient instead);
- Adam on all biases at once (laid end to end).

Numerics: the recipe's loss and Adam's formulas (torch's fused Adam arithmetic, bias corrections
and eps placement included; the same bits as ``torch.optim.Adam(fused=True)`` for the same
gradient); gradients equal autograd's up to float rounding (other summation orders).

State: parameters keep their names, shapes and ``state_dict``; they become views into one flat
buffer (weights, then biases). The optimizer keeps its per-parameter state (``step``,
``exp_avg``, ``exp_avg_sq``) as views into the flat moments, so checkpoints and restores see
what they always saw; after a restore (:meth:`ExplicitStep.invalidate`) the state is adopted
again. Parameter gradients are not kept (``.grad`` stays None) unless ``keep_grads``.

The normalisation's backward: ``F.normalize(v) = v / max(||v||, eps)``; with ``u`` its output,
``dv = (g - u (u . g)) / ||v||`` where ``||v|| >= eps`` and ``dv = g / eps`` where the norm is below
eps (clamp_min passes no gradient there): autograd's derivative.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import dsae_step as kernels

NORMALIZE_EPS = 1e-12  # F.normalize's default, which DSAE uses


def dsae_loss_and_grads(x_hat: Tensor, x: Tensor, h: Tensor, P: Tensor, y: Tensor, lam: float,
                        check_finite: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rec, sup, d loss / d x_hat, d loss / d h) of one batch: the fused loss op, asked
    for the gradients at unit upstream gradient, which it forms while each row is in cache. The
    step's only contact with the loss; the two gradients are fresh [B, D] / [B, d] contiguous
    outputs of the op, the caller's to overwrite (the step adds the decoder's gradient into
    d loss / d h in place)."""
    loss, rec, sup, _, _, _, grad_x_hat, grad_h = torch.ops.sdml.dsae_loss.default(
        x_hat, x, h, P, y, lam, check_finite, True, True)
    return loss, rec, sup, grad_x_hat, grad_h


class _Dense:
    """One Linear layer of the chain: detached views of its weight [out, in], bias [out], their
    Adam moments and (with keep_grads) gradients; the bias gradient's view; the buffers of its
    output [B, out] (after bias and ReLU) and of its output's gradient."""

    def __init__(self, linear: nn.Linear, views: dict, batch: int, relu: bool):
        self.w, self.b = linear.weight.detach(), linear.bias.detach()
        self.w_state, self.b_state = views[id(linear.weight)], views[id(linear.bias)]
        self.relu = relu
        n_out = self.w.shape[0]
        self.out = self.w.new_empty((batch, n_out))
        self.grad_out = self.w.new_empty((batch, n_out))


class _ParamViews:
    """One parameter's views into the flat buffers: value, gradient (or None), exp_avg, exp_avg_sq."""

    def __init__(self, value: Tensor, grad: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor):
        self.value, self.grad, self.exp_avg, self.exp_avg_sq = value, grad, exp_avg, exp_avg_sq


class ExplicitStep:
    """The autograd-free training step of one DSAE on the CPU, bound to a model, its Adam and
    its loss (see the module's docstring).

    Args:
        model: the DSAE (float32 or float64, on the CPU); its parameters are moved into one flat
            buffer (same names, shapes and values).
        optimizer: the model's ``torch.optim.Adam`` over ``model.parameters()`` in order, one
            plain parameter group (no amsgrad, maximize or weight decay); its lr, betas and eps are
            read at every step, its state is kept as views into the flat moments.
        loss: the DSAELoss (P, lam, check_finite).
        batch: rows of every batch.
        keep_grads: also write every parameter's gradient to its ``.grad`` (views into a flat
            gradient buffer): for tests and :meth:`gradients`; the step does not need them.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, loss, batch: int, keep_grads: bool = False):
        params = list(model.parameters())
        held = optimizer.param_groups[0]["params"] if len(optimizer.param_groups) == 1 else []
        if len(held) != len(params) or any(a is not b for a, b in zip(held, params)):
            raise ValueError("explicit step: the optimizer must hold the model's parameters, in order, in one group")
        group = optimizer.param_groups[0]
        if group["amsgrad"] or group["maximize"] or group["weight_decay"] != 0 or group.get("decoupled_weight_decay"):
            raise ValueError("explicit step: implements plain Adam (no amsgrad, maximize or weight decay)")
        like = params[0].detach()
        if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"explicit step: needs float32 or float64 parameters on the CPU, got {like.dtype} on {like.device}")
        self.model, self.optimizer, self.loss, self.batch = model, optimizer, loss, int(batch)
        self.params = params
        # Weights first, then the biases end to end (one Adam call for all of them).
        order = [p for p in params if p.dim() > 1] + [p for p in params if p.dim() <= 1]
        total = sum(p.numel() for p in params)
        self.n_bias = sum(p.numel() for p in params if p.dim() <= 1)
        self.flat = like.new_empty(total)
        self.exp_avg = like.new_zeros(total)
        self.exp_avg_sq = like.new_zeros(total)
        self.grad = like.new_zeros(total) if keep_grads else None
        bias_grad = self.grad[total - self.n_bias :] if keep_grads else like.new_zeros(self.n_bias)
        self.keep_grads = bool(keep_grads)
        views: dict[int, _ParamViews] = {}
        offset = 0
        with torch.no_grad():
            for p in order:
                n = p.numel()
                span = slice(offset, offset + n)
                value = self.flat[span].view_as(p)
                value.copy_(p)
                p.data = value
                if keep_grads:
                    grad = self.grad[span].view_as(p)
                    p.grad = grad
                elif p.dim() <= 1:
                    grad = bias_grad[offset - (total - self.n_bias) : offset - (total - self.n_bias) + n].view_as(p)
                else:
                    grad = None
                views[id(p)] = _ParamViews(value, grad, self.exp_avg[span].view_as(p), self.exp_avg_sq[span].view_as(p))
                offset += n
        self._views = [views[id(p)] for p in params]
        self._biases = slice(total - self.n_bias, total)
        self._bias_grad = bias_grad
        self.steps = torch.zeros(len(params), dtype=torch.float32)  # torch's fused Adam keeps float32 steps
        self._step = 0
        self._bound = False
        self.encoder = self._chain(model.encoder, views, batch)
        self.decoder = self._chain(model.decoder, views, batch)
        self.code_norm = like.new_empty(batch) if model.normalize_code else None
        self.output_norm = like.new_empty(batch) if model.normalize_output else None
        self.code = like.new_empty(self.encoder[-1].out.shape) if model.normalize_code else None
        self.x_hat = like.new_empty(self.decoder[-1].out.shape) if model.normalize_output else None

    @staticmethod
    def _chain(sequential: nn.Sequential, views: dict, batch: int) -> list[_Dense]:
        layers = list(sequential)
        dense = []
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                dense.append(_Dense(layer, views, batch, relu))
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
        for i, (p, views) in enumerate(zip(self.params, self._views)):
            held = state.get(p) or {}
            if held:
                views.exp_avg.copy_(held["exp_avg"])
                views.exp_avg_sq.copy_(held["exp_avg_sq"])
                self.steps[i] = held["step"]
            else:
                views.exp_avg.zero_()
                views.exp_avg_sq.zero_()
                self.steps[i] = 0
            state[p] = {"step": self.steps[i], "exp_avg": views.exp_avg, "exp_avg_sq": views.exp_avg_sq}
        if not bool((self.steps == self.steps[0]).all()):
            raise ValueError("explicit step: the optimizer's parameters have taken different numbers of steps")
        self._step = int(self.steps[0])
        self._bound = True

    # -- the step --------------------------------------------------------------------------------

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(h, x_hat) of the batch, every layer's output left in its buffer."""
        h = self._dense_chain(x, self.encoder, self.code, self.code_norm)
        return h, self._dense_chain(h, self.decoder, self.x_hat, self.output_norm)

    @staticmethod
    def _dense_chain(a: Tensor, layers, normalized: Tensor, norm: Tensor | None) -> Tensor:
        """Runs `layers` (GEMM, then bias and ReLU in one pass, into each layer's buffer) from `a`;
        with `norm`, the last output's rows are normalised into `normalized` (row norms in `norm`)."""
        for layer in layers:
            kernels.dense_forward(a, layer.w, layer.b, layer.relu, layer.out)
            a = layer.out
        if norm is not None:
            kernels.normalize_rows(a, NORMALIZE_EPS, normalized, norm)
            a = normalized
        return a

    def _top_grad(self, grad: Tensor, out: Tensor, norm: Tensor | None, layer: _Dense) -> Tensor:
        """The gradient of the chain's last layer's pre-activation from that of the chain's
        output (`out`, normalised when `norm` is given), and that layer's bias gradient."""
        if norm is not None:
            kernels.normalize_rows_backward(grad, out, norm, NORMALIZE_EPS, layer.grad_out, layer.b_state.grad)
            return layer.grad_out
        kernels.dense_grad(grad, None, layer.b_state.grad)
        return grad

    def _backward_chain(self, chain: list[_Dense], x: Tensor, g: Tensor, step: int | None,
                        grad_in: Tensor | None = None) -> None:
        """Backward through `chain` (input x) from g, the gradient of its last layer's
        pre-activation (bias gradient already taken): every layer's weights updated by Adam
        (`step`: this update's count) or, for step None, their gradients written; the layers' bias
        gradients; and the gradient of the chain's input added to grad_in unless grad_in is None."""
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]), step=step)
        for k in range(len(chain) - 1, -1, -1):
            layer = chain[k]
            below = chain[k - 1] if k > 0 else None
            # The input's gradient first: it needs the weights before their update.
            if below is not None:
                kernels.dense_input_grad(g, layer.w, below.grad_out)
            elif grad_in is not None:
                kernels.dense_input_grad(g, layer.w, grad_in, accumulate=True)  # in place: no copy of grad_in
            inputs = below.out if below is not None else x
            if step is not None:
                kernels.linear_weight_grad_adam(g, inputs, layer.w, layer.w_state.exp_avg, layer.w_state.exp_avg_sq,
                                                grad_weight=layer.w_state.grad, **hyper)
            else:
                torch.mm(g.t(), inputs, out=layer.w_state.grad)
            if below is not None:
                kernels.dense_grad(below.grad_out, below.out if below.relu else None, below.b_state.grad)
                g = below.grad_out

    def _run(self, x: Tensor, y: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 2 or x.shape[0] != self.batch:
            raise ValueError(f"explicit step: x must have {self.batch} rows (the batch size), got shape {tuple(x.shape)}")
        x, y = x.contiguous(), y.contiguous()
        if not self._bound:
            self._bind()
        step = self._step + 1 if update else None
        h, x_hat = self._forward(x)
        loss_fn = self.loss
        loss, rec, sup, grad_x_hat, grad_h = dsae_loss_and_grads(
            x_hat, x, h, loss_fn.P, y, loss_fn.lam, loss_fn.check_finite)
        enc, dec = self.encoder, self.decoder
        g = self._top_grad(grad_x_hat, x_hat, self.output_norm, dec[-1])
        # The code's gradient: the loss's (grad_h, ours to overwrite) plus the decoder's.
        self._backward_chain(dec, h, g, step, grad_in=grad_h)
        g = self._top_grad(grad_h, h, self.code_norm, enc[-1])
        self._backward_chain(enc, x, g, step)
        if step is not None:
            group = self.optimizer.param_groups[0]
            beta1, beta2 = group["betas"]
            kernels.adam_update(self.flat[self._biases], self._bias_grad, self.exp_avg[self._biases],
                                self.exp_avg_sq[self._biases], lr=float(group["lr"]), beta1=float(beta1),
                                beta2=float(beta2), eps=float(group["eps"]), step=step)
            self._step = step
            self.steps.add_(1)
        return loss, rec, sup

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One Adam step on the batch (x [B, D], y [B, c] label rows); returns (loss, rec, sup)."""
        return self._run(x, y, update=True)

    @torch.no_grad()
    def gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """The batch's loss, every parameter's gradient written to its ``.grad``, and nothing
        updated (needs keep_grads): the hand-written backward on its own, for tests."""
        if not self.keep_grads:
            raise ValueError("explicit step: gradients() needs keep_grads=True")
        return self._run(x, y, update=False)[0]
