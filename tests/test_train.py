"""The per-modality trainer: recipe, model selection, seeding, bad input."""

import math

import numpy as np
import pytest
import torch

from helpers import small_tasks

from sdml_ext.data import make_synthetic
from sdml_ext.model import DSAE
from sdml_ext.engine.training import ModalityTrainer, TrainOptions



@pytest.fixture(scope="module")
def data():
    return make_synthetic(3, n_train=220, n_val=60, n_test=60, n_classes=5, seed=1)


def test_recipe_defaults():
    opts = TrainOptions()
    # The authors' recipe, except the demo's epochs (the paper trains 200).
    assert (opts.epochs, opts.batch_size, opts.lam, opts.betas) == (40, 100, 0.5, (0.5, 0.999))
    assert [opts.lr_for(i) for i in range(3)] == [1e-4, 2e-4, 2e-4]
    assert TrainOptions(lr=1e-3).lr == (1e-3,) and TrainOptions(hidden=[8]).hidden == (8,)


def test_run_config_is_the_train_options_plus_the_run():
    from sdml_ext.engine.config import RunConfig, resolve_config

    config = resolve_config({"lr": [1e-3, 2e-3], "epochs": 5, "hidden": [8, 8], "dataset": "synthetic"})
    assert isinstance(config, TrainOptions) and config.lr_for(3) == 2e-3
    options = config.train_options()
    assert type(options) is TrainOptions
    assert options == TrainOptions(epochs=5, lr=(1e-3, 2e-3), hidden=(8, 8))
    # One set of defaults: a default RunConfig trains exactly like default TrainOptions.
    assert RunConfig().train_options() == TrainOptions()


def test_trainer_uses_fused_adam_and_per_modality_lr(data):
    tasks = small_tasks(data, epochs=1, lr=(1e-3, 5e-4))
    trainers = [ModalityTrainer(t) for t in tasks[:2]]
    assert [t.optimizer.param_groups[0]["lr"] for t in trainers] == [1e-3, 5e-4]
    assert all(t.optimizer.defaults["fused"] for t in trainers)
    assert trainers[0].optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    assert trainers[0].steps_per_epoch == 220 // 50  # the last incomplete batch is dropped


def test_training_reduces_the_loss_and_keeps_the_best_validation_epoch(data):
    trainer = ModalityTrainer(small_tasks(data, epochs=8, lr=(1e-3,))[0])
    result = trainer.run()
    history = result.history
    assert len(history) == 8 and [s.epoch for s in history] == list(range(1, 9))
    assert history[-1].train_loss < history[0].train_loss
    best = min(range(8), key=lambda i: history[i].val_sup)
    assert result.best_epoch == best + 1 and history[best].best
    # The kept weights are that epoch's: rescoring them gives its validation loss back.
    model = DSAE(**result.model_options)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in result.state.items() if not k.startswith("preprocess.")})
    trainer.model.load_state_dict(model.state_dict())
    _, _, sup = trainer.evaluate_split(trainer.val_x, trainer.val_y)
    assert sup == pytest.approx(history[best].val_sup, rel=1e-5)
    assert result.selection.startswith("lowest validation")
    assert result.state["preprocess.shift"].shape == (data["m0"].dim,)


def test_same_seed_same_model_other_seed_or_index_differs(data):
    a = ModalityTrainer(small_tasks(data, epochs=2)[1]).run()
    b = ModalityTrainer(small_tasks(data, epochs=2)[1]).run()
    c = ModalityTrainer(small_tasks(data, epochs=2, seed=5)[1]).run()
    assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    assert not np.array_equal(a.state["encoder.0.weight"], c.state["encoder.0.weight"])
    assert TrainOptions().seed_for(0) != TrainOptions().seed_for(1)


def test_reshuffles_every_epoch(data):
    trainer = ModalityTrainer(small_tasks(data, epochs=2)[0])
    trainer.begin_epoch()
    first = trainer._perm.clone()
    trainer.begin_epoch()
    assert not torch.equal(first, trainer._perm)


def test_semi_supervised_and_no_validation_data():
    ds = make_synthetic(1, n_train=200, n_val=0, n_test=10, n_classes=4, unlabelled=0.5)
    result = ModalityTrainer(small_tasks(ds, epochs=3)[0]).run()
    assert result.best_epoch == 3 and result.selection.startswith("last epoch")
    assert all(math.isfinite(s.train_loss) and math.isnan(s.val_sup) for s in result.history)


def test_fewer_samples_than_a_batch_is_a_clear_error():
    ds = make_synthetic(1, n_train=30, n_val=10, n_test=10, n_classes=3)
    with pytest.raises(ValueError, match="fewer than the batch size 50"):
        ModalityTrainer(small_tasks(ds, epochs=1)[0])


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lam=1.5), dict(lr=(-1e-4,)), dict(preprocess="zscore")])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        TrainOptions(**bad)


def test_trainers_built_in_threads_get_their_own_initial_weights(data):
    # The CUDA parallel strategy builds one trainer per thread; seeding must not interleave.
    import threading

    tasks = small_tasks(data, epochs=1) * 3
    expected = [ModalityTrainer(t).model.state_dict() for t in tasks]
    built = [None] * len(tasks)

    def build(i):
        built[i] = ModalityTrainer(tasks[i]).model.state_dict()

    threads = [threading.Thread(target=build, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(expected, built):
        assert all(torch.equal(a[k], b[k]) for k in a)
