"""The CPU's autograd-free training step (sdml_ext.engine.explicit_step) against the autograd
step it replaces: the hand-written backward in float64, whole Adam steps in float32 on awkward
shapes (batch 1, odd widths, unlabelled rows, either normalisation off), and the state it keeps
(parameter names, optimizer state, checkpoints, restores)."""

import copy

import numpy as np
import pytest
import torch

from helpers import small_tasks

from sdml_ext.data import make_synthetic
from sdml_ext.engine.explicit_step import ExplicitStep
from sdml_ext.engine.training import ModalityTrainer
from sdml_ext.loss import DSAELoss
from sdml_ext.model import DSAE, make_projection

# (batch, D, hidden, code, classes, normalize_code, normalize_output)
CASES = [
    (1, 7, (5,), 4, 3, True, True),
    (5, 13, (16, 9), 8, 3, True, True),
    (6, 33, (40, 24), 12, 5, False, True),
    (4, 11, (24, 24), 6, 2, True, False),
    (3, 9, (12,), 5, 5, False, False),
    (20, 130, (70, 1030), 16, 4, True, True),  # past a column block and a weight tile
]
LR, BETAS = 1e-3, (0.5, 0.999)


def build(case, dtype, seed=0):
    B, D, hidden, code, c, norm_code, norm_out = case
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DSAE(D, code, hidden, normalize_code=norm_code, normalize_output=norm_out).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    y = torch.zeros(B, c, dtype=dtype)
    y[torch.arange(B), torch.randint(0, c, (B,), generator=g)] = 1
    y[::3] = 0  # unlabelled rows (the first one included: a batch of 1 has none labelled)
    loss = DSAELoss(make_projection(code, c, seed).to(dtype), lam=0.5)
    return model, x, y, loss


def autograd_grads(model, x, y, loss):
    model.zero_grad(set_to_none=True)
    h, x_hat = model(x)
    out = loss(x_hat, x, h, y)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_hand_backward_is_autograds_in_float64(case):
    model, x, y, loss = build(case, torch.float64)
    ref_model = copy.deepcopy(model)
    expected_loss, expected = autograd_grads(ref_model, x, y, loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
    step = ExplicitStep(model, optimizer, loss, case[0], keep_grads=True)
    got_loss = step.gradients(x, y)
    assert float(abs(got_loss - expected_loss)) <= 1e-14 * float(abs(expected_loss))
    for name, p in model.named_parameters():
        scale = float(expected[name].abs().max())
        assert float((p.grad - expected[name]).abs().max()) <= 1e-12 * max(scale, 1e-300), name
    # gradients() moved nothing
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("case", CASES)
def test_explicit_steps_are_adam_steps_of_the_autograd_gradient(case):
    """Three float32 steps: weights, Adam moments and step counts as torch.optim.Adam(fused)
    after autograd, to float rounding of the gradients. Each step starts the reference from the
    explicit step's weights and moments: otherwise one step's rounding, amplified by Adam where
    a gradient is at rounding level, changes the next step's gradients by an amount that
    depends on the machine's GEMM kernels rather than on the step."""
    model, x, y, loss = build(case, torch.float32, seed=3)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR, betas=BETAS, fused=True)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, fused=True)
    step = ExplicitStep(model, opt, loss, case[0])
    for k in range(3):
        if k:
            with torch.no_grad():
                for param, ref_param in zip(model.parameters(), ref.parameters()):
                    ref_param.copy_(param)
                    for key in ("exp_avg", "exp_avg_sq"):
                        ref_opt.state[ref_param][key].copy_(opt.state[param][key])
        before = [p.detach().clone() for p in model.parameters()]
        xs = x + 0.1 * k  # another batch each step
        losses = step(xs, y)
        ref_opt.zero_grad(set_to_none=True)
        h, x_hat = ref(xs)
        out = loss(x_hat, xs, h, y)
        out.loss.backward()
        ref_opt.step()
        for a, b in zip(losses, (out.loss, out.rec, out.sup)):
            assert float(abs(a - b.detach())) <= 1e-6 * max(float(abs(b.detach())), 1e-6)
        for (name, param), ref_param, p0 in zip(model.named_parameters(), ref.parameters(), before):
            p, q = param.detach(), ref_param.detach()
            mine, theirs = opt.state[param], ref_opt.state[ref_param]
            assert float(mine["step"]) == float(theirs["step"]) == k + 1 and mine["step"].dtype == theirs["step"].dtype
            for key in ("exp_avg", "exp_avg_sq"):
                scale = float(theirs[key].abs().max())
                assert float((mine[key] - theirs[key]).abs().max()) <= 1e-5 * max(scale, 1e-30), (k, name, key)
            # A weight's update is lr * m / (sqrt(v) + eps): a gradient's rounding moves it by a
            # tiny part of lr, up to a percent of lr where the gradient is at rounding level
            # (~1e-11, not small next to eps), so the bound is on the distance as a whole.
            assert float((p - q).norm()) <= 1e-4 * float((q - p0).norm()), (k, name)
            assert float((p - q).abs().max()) <= 1e-2 * LR, (k, name)
            assert param.grad is None  # the step keeps no gradients


def test_parameters_become_views_of_one_buffer_with_names_and_values_kept():
    model, x, y, loss = build(CASES[1], torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, fused=True)
    step = ExplicitStep(model, opt, loss, CASES[1][0])
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    flat = step.flat
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and p.is_leaf and p.requires_grad
    assert opt.state == {}  # no state before the first step, as torch's Adam
    step(x, y)
    for p in model.parameters():
        assert list(opt.state[p]) == ["step", "exp_avg", "exp_avg_sq"]
        assert opt.state[p]["exp_avg"].untyped_storage().data_ptr() == step.exp_avg.untyped_storage().data_ptr()
    model.load_state_dict(before)  # in place: the views stay views
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in model.parameters())
    assert torch.equal(model.encoder[0].weight, before["encoder.0.weight"])


def test_refuses_what_it_does_not_implement():
    model, _, _, loss = build(CASES[1], torch.float32)
    with pytest.raises(ValueError, match="plain Adam"):
        ExplicitStep(model, torch.optim.Adam(model.parameters(), weight_decay=0.1), loss, 5)
    with pytest.raises(ValueError, match="in order, in one group"):
        ExplicitStep(model, torch.optim.Adam(list(model.parameters())[::-1]), loss, 5)
    with pytest.raises(ValueError, match="needs float32 or float64"):
        half = copy.deepcopy(model).half()
        ExplicitStep(half, torch.optim.Adam(half.parameters()), loss, 5)
    fresh = copy.deepcopy(model)
    step = ExplicitStep(fresh, torch.optim.Adam(fresh.parameters()), loss, 5)
    with pytest.raises(ValueError, match="keep_grads"):
        step.gradients(torch.zeros(5, 13), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"x must have 5 rows \(the batch size\), got shape \(4, 13\)"):
        step(torch.zeros(4, 13), torch.zeros(4, 3))


# ---- inside the trainer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return make_synthetic(2, n_train=230, n_val=60, n_test=20, n_classes=5, unlabelled=0.2, seed=4)


def train(trainer, epochs):
    while trainer.epoch < epochs:
        trainer.begin_epoch()
        for j in range(trainer.steps_per_epoch):
            trainer.step(j)
        trainer.end_epoch()
    return trainer


def test_trainer_takes_explicit_steps_on_the_cpu_and_keeps_its_checkpoint_format(data):
    task = small_tasks(data, epochs=3, lr=(1e-3,))[1]
    explicit, reference = ModalityTrainer(task), ModalityTrainer(task, explicit=False)
    assert explicit._explicit is not None and reference._explicit is None
    with pytest.raises(ValueError, match="explicit steps run on the CPU without graphs"):
        ModalityTrainer(task, graphs=True, explicit=True)
    train(explicit, 3), train(reference, 3)
    (t1, r1), (t2, r2) = explicit.state(), reference.state()
    assert {k: (v.shape, v.dtype) for k, v in t1.items()} == {k: (v.shape, v.dtype) for k, v in t2.items()}
    assert r1.keys() == r2.keys() and r1["epoch"] == r2["epoch"] == 3
    # the same training to float rounding (Adam magnifies rounding on weights with ~0 gradient)
    diff = sum(float((a - b).double().square().sum()) for a, b in zip(explicit.model.state_dict().values(), reference.model.state_dict().values()))
    init = ModalityTrainer(task).model.state_dict().values()
    moved = sum(float((a - b).double().square().sum()) for a, b in zip(reference.model.state_dict().values(), init))
    assert diff ** 0.5 <= 1e-3 * moved ** 0.5
    np.testing.assert_allclose([s.train_loss for s in explicit.history], [s.train_loss for s in reference.history], rtol=1e-5)


def test_restore_continues_bit_for_bit_and_adopts_autograd_state(data):
    task = small_tasks(data, epochs=4, lr=(1e-3,))[0]
    straight = train(ModalityTrainer(task), 4)
    first = train(ModalityTrainer(task), 2)
    tensors, record = first.state()
    resumed = ModalityTrainer(task)
    train(resumed, 1)  # steps taken, then the state is replaced under them
    resumed.restore(tensors, record)
    train(resumed, 4)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert [s.train_loss for s in straight.history] == [s.train_loss for s in resumed.history]
    # A checkpoint of autograd steps continues on explicit ones (and its moments are adopted).
    auto = train(ModalityTrainer(task, explicit=False), 2)
    crossed = ModalityTrainer(task)
    crossed.restore(*auto.state())
    train(crossed, 4)
    assert all(float(s["step"]) == 4 * crossed.steps_per_epoch for s in crossed.optimizer.state.values())
    diff = sum(float((a - b).double().square().sum()) for a, b in zip(crossed.model.state_dict().values(), straight.model.state_dict().values()))
    norm = sum(float(a.double().square().sum()) for a in straight.model.state_dict().values())
    assert diff ** 0.5 <= 1e-4 * norm ** 0.5
