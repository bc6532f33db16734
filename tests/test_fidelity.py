"""The product's training step against the independent reference of the authors' loop
(benchmarks/fidelity_reference.py): from the same weights, P and batch order they must be the
same algorithm, and the reference's float64 AP must agree with sdml_ext's metrics."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fidelity_reference as ref  # noqa: E402
from fidelity_lockstep import NAMES, fused_loss, to_reference  # noqa: E402

from sdml_ext.data import make_synthetic  # noqa: E402
from sdml_ext.metrics import cross_modal_map  # noqa: E402
from sdml_ext.model import make_projection  # noqa: E402
from sdml_ext.engine.training import ModalityTrainer, TrainOptions, make_tasks  # noqa: E402


def _lockstep(swap: bool, epochs: int = 2, explicit: bool | None = None):
    """Trains modality 1 of a small synthetic set (unlabelled rows included) with the product's
    trainer (``explicit``: its CPU step, see ModalityTrainer) and with the reference loop from
    the same start; returns both weight vectors and both validation-loss curves."""
    torch.manual_seed(0)
    ds = make_synthetic(2, dims=(9, 13), n_classes=3, n_train=70, n_val=21, n_test=9, unlabelled=0.2, seed=3)
    opts = TrainOptions(epochs=epochs, batch_size=16, hidden=(32, 24), code_dim=8, preprocess="none", seed=5)
    P = make_projection(8, ds.num_classes, 5)
    task = make_tasks(ds, P, opts)[1]
    trainer = ModalityTrainer(task, explicit=explicit)

    class Small(ref.Autoencoder):
        def __init__(self, dim):
            torch.nn.Module.__init__(self)
            self.enc1, self.enc2, self.enc3 = torch.nn.Linear(dim, 32), torch.nn.Linear(32, 24), torch.nn.Linear(24, 8)
            self.dec1, self.dec2, self.dec3 = torch.nn.Linear(8, 24), torch.nn.Linear(24, 32), torch.nn.Linear(32, dim)

    net = Small(task.input_dim)
    net.load_state_dict(to_reference(trainer.model.state_dict()))
    shuffle = torch.Generator()
    shuffle.set_state(trainer.shuffle.get_state())  # the orders the trainer is about to draw
    orders = [torch.randperm(task.train_x.shape[0], generator=shuffle).numpy() for _ in range(epochs)]
    fused = swap
    opt = torch.optim.Adam(net.parameters(), lr=trainer.lr, betas=ref.BETAS, fused=fused)
    _, run = ref.train_modality(
        task.train_x, task.train_y, task.val_x, task.val_y, P, trainer.lr, 0, epochs, 16,
        model=net, loss_fn=fused_loss if fused else ref.eager_loss,
        make_optimizer=lambda params, lr: opt, order=lambda e, n: orders[e - 1],
    )
    result = trainer.run()
    product = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    state = net.state_dict()
    reference = torch.cat([
        state[f"{NAMES[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}"].flatten()
        for k, _ in trainer.model.named_parameters()
    ])
    return product, reference, [s.val_sup for s in result.history], run.val_sup, result.best_epoch, run.best_epoch


def test_product_step_is_the_reference_step_with_its_fused_loss_and_adam():
    """With the product's two fused pieces swapped into the reference, nothing else differs:
    data order, batches (last incomplete one dropped), loss wiring, Adam settings, selection.
    Bitwise for the product's autograd step (what CUDA devices run)."""
    product, reference, vp, vr, bp, br = _lockstep(swap=True, explicit=False)
    assert torch.equal(product, reference)
    np.testing.assert_allclose(vp, vr, rtol=1e-6)  # float32 row norms vs the reference's float64
    assert bp == br


def test_product_cpu_step_is_the_reference_step_to_rounding():
    """The CPU's explicit step (hand-written backward, one Adam pass over flat buffers) is the
    same algorithm: the reference's weights and curves up to float32 rounding, the same selection."""
    product, reference, vp, vr, bp, br = _lockstep(swap=True)
    assert float((product - reference).norm() / reference.norm()) < 1e-5
    np.testing.assert_allclose(vp, vr, rtol=1e-5)
    assert bp == br


def test_product_step_matches_eager_reference_to_rounding():
    """Eager loss + unfused Adam: the same algorithm up to float32 rounding."""
    product, reference, vp, vr, _, _ = _lockstep(swap=False)
    assert float((product - reference).norm() / product.norm()) < 1e-5
    np.testing.assert_allclose(vp, vr, rtol=1e-4)


@pytest.mark.parametrize("multilabel", [False, True])
def test_reference_ap_agrees_with_sdml_metrics(multilabel):
    g = torch.Generator().manual_seed(1)
    codes = [torch.randn(n, 6, generator=g) for n in (7, 11, 5)]
    codes[1][3] = codes[1][8]  # ties in similarity: broken by ascending gallery index in both
    codes[2] = codes[2].round()  # many exact ties
    if multilabel:
        labels = [(torch.rand(n, 4, generator=g) < 0.3).long() for n in (7, 11, 5)]
        labels[0][0] = 0  # a query with no relevant item counts 0
    else:
        labels = [torch.randint(-1, 3, (n,), generator=g) for n in (7, 11, 5)]
    product = cross_modal_map(codes, labels, None, empty="zero")
    table, average = ref.map_table([c.double().numpy() for c in codes], [lab.numpy() for lab in labels])
    np.testing.assert_allclose(product.table.numpy(), table, rtol=1e-6, atol=1e-7)
    assert average == pytest.approx(product.average, rel=1e-6)


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-5, 1e-7])
def test_fused_gradient_matches_eager_at_small_residuals(scale):
    """Near convergence (tiny residuals) the fused float32 gradient is the eager expression's
    float32 autograd gradient to rounding: float32 cancellation in P^T h - y limits both alike."""
    g = torch.Generator().manual_seed(2)
    B, D, d, c = 64, 37, 96, 7
    P = make_projection(d, c, 4)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.zeros(B, c)
    y[torch.arange(B), torch.randint(0, c, (B,), generator=g)] = 1
    y[:3] = 0  # unlabelled rows
    h0 = torch.nn.functional.normalize(y @ P.T + scale * torch.randn(B, d, generator=g), dim=1)
    h0[:3] = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=1)
    x_hat0 = x + scale * torch.randn(B, D, generator=g)
    x_hat0[5] = x[5]  # an exact reconstruction: gradient 0, not NaN
    grads = []
    for loss_fn in (ref.eager_loss, fused_loss):
        x_hat, h = x_hat0.clone().requires_grad_(), h0.clone().requires_grad_()
        loss_fn(x_hat, x, h, P, y, 0.5)[0].backward()
        grads.append((x_hat.grad, h.grad))
    (ex, eh), (fx, fh) = grads
    assert torch.isfinite(fx).all() and torch.isfinite(fh).all()
    assert float((fx - ex).norm() / ex.norm()) < 1e-6
    assert float((fh - eh).norm() / eh.norm()) < 1e-6
