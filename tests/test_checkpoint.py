"""Checkpoints and exact resume: a run stopped after any epoch (or inside the first) and
continued from its checkpoints gives the same models, bit for bit, as one never stopped."""

import json

import numpy as np
import pytest
import torch

from helpers import small_tasks

from sdml_ext.engine.checkpoint import Checkpoints, default_every_s
from sdml_ext.data import make_synthetic
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import ModalityTrainer

EPOCHS = 4


def make(ds, **options):
    return small_tasks(ds, **{"epochs": EPOCHS, **options})


@pytest.fixture(scope="module")
def tasks():
    ds = make_synthetic(3, dims=[40, 24, 8], n_train=[250, 150, 200], n_val=40, n_test=40, n_classes=5, seed=2)
    return make(ds)


@pytest.fixture(scope="module")
def reference(tasks):
    return train_tasks(tasks, "serial").modalities


def assert_identical(results, reference):
    assert [r.name for r in results] == [r.name for r in reference]
    for a, b in zip(results, reference):
        assert a.best_epoch == b.best_epoch and a.selection == b.selection, a.name
        assert a.state.keys() == b.state.keys()
        for key in a.state:
            assert np.array_equal(a.state[key], b.state[key]), f"{a.name} {key}"
        # Every epoch's losses, bit for bit (NaN where there is no validation data).
        for x, y in zip(a.history, b.history):
            assert json.dumps(vars(x)) == json.dumps(vars(y)), a.name
        assert len(a.history) == len(b.history) == EPOCHS


class Stop(KeyboardInterrupt):
    pass


def stop_after(modality, epoch):
    def on_epoch(stats):
        if (stats.modality, stats.epoch) == (modality, epoch):
            raise Stop

    return on_epoch


@pytest.mark.parametrize("strategy", ["serial", "joint"])
@pytest.mark.parametrize("k", [1, 2, EPOCHS - 1])
def test_stopped_after_k_epochs_resumes_to_the_identical_models(tasks, reference, tmp_path, strategy, k):
    checkpoints = Checkpoints(str(tmp_path), every_s=0)
    with pytest.raises(Stop):
        train_tasks(tasks, strategy, on_epoch=stop_after("m1", k), checkpoints=checkpoints)
    seen = []
    report = train_tasks(tasks, strategy, on_epoch=seen.append, checkpoints=checkpoints)
    assert_identical(report.modalities, reference)
    # Past epochs are replayed to the progress callback: every modality shows all its epochs.
    assert sorted((s.modality, s.epoch) for s in seen) == sorted((t.name, e) for t in tasks for e in range(1, EPOCHS + 1))


def test_parallel_stopped_resumes_to_the_identical_models(tasks, reference, tmp_path):
    checkpoints = Checkpoints(str(tmp_path), every_s=0)
    with pytest.raises(Stop):
        train_tasks(tasks, "parallel", cores=2, on_epoch=stop_after("m0", 2), checkpoints=checkpoints)
    assert (tmp_path / "ckpt-00.safetensors").exists()
    report = train_tasks(tasks, "parallel", cores=2, checkpoints=checkpoints)
    assert_identical(report.modalities, reference)


def test_stopped_inside_the_first_epoch_starts_over_identically(tasks, reference, tmp_path, monkeypatch):
    checkpoints = Checkpoints(str(tmp_path), every_s=0)
    step = ModalityTrainer.step

    def stop_in_epoch_one(self, j):
        if self.task.name == "m0" and self.epoch == 0 and j == 2:
            raise Stop
        step(self, j)

    monkeypatch.setattr(ModalityTrainer, "step", stop_in_epoch_one)
    with pytest.raises(Stop):
        train_tasks(tasks, "serial", checkpoints=checkpoints)
    monkeypatch.setattr(ModalityTrainer, "step", step)
    assert not list(tmp_path.glob("ckpt-*"))
    assert_identical(train_tasks(tasks, "serial", checkpoints=checkpoints).modalities, reference)


def test_finished_modalities_are_not_retrained(tasks, reference, tmp_path, monkeypatch):
    # A long cadence: only finished modalities have checkpoints.
    checkpoints = Checkpoints(str(tmp_path), every_s=3600)
    with pytest.raises(Stop):
        train_tasks(tasks, "serial", on_epoch=stop_after("m1", 2), checkpoints=checkpoints)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00.safetensors"]
    assert checkpoints.finished() == [0]
    stepped = set()
    step = ModalityTrainer.step

    def record(self, j):
        stepped.add(self.task.name)
        step(self, j)

    monkeypatch.setattr(ModalityTrainer, "step", record)
    assert_identical(train_tasks(tasks, "serial", checkpoints=checkpoints).modalities, reference)
    assert stepped == {"m1", "m2"}
    assert checkpoints.finished() == [0, 1, 2]


def test_checkpoint_is_safetensors_with_a_json_record_and_refuses_another_config(tasks, tmp_path):
    checkpoints = Checkpoints(str(tmp_path), every_s=0)
    trainer = ModalityTrainer(tasks[0])
    trainer.run(checkpoints=checkpoints)
    raw = (tmp_path / "ckpt-00.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    record = json.loads(header["__metadata__"]["sdml"])
    assert record["trainer"]["epoch"] == EPOCHS and record["task"]["name"] == "m0"
    assert {"model.encoder.0.weight", "adam.0.exp_avg", "adam.0.exp_avg_sq", "adam.0.step", "rng.shuffle"} <= set(header)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    other = make_synthetic(1, dims=[40], n_train=250, n_val=40, n_test=40, n_classes=5, seed=2)
    with pytest.raises(ValueError, match="another configuration"):
        ModalityTrainer(make(other, lam=0.25)[0]).run(checkpoints=checkpoints)
    (tmp_path / "ckpt-00.safetensors").write_bytes(raw[:100])
    with pytest.raises(ValueError, match="unreadable"):
        ModalityTrainer(tasks[0]).run(checkpoints=checkpoints)


def test_restored_trainer_state_round_trips(tasks):
    a = ModalityTrainer(tasks[2])
    for _ in range(2):
        a.begin_epoch()
        for j in range(a.steps_per_epoch):
            a.step(j)
        a.end_epoch()
    b = ModalityTrainer(tasks[2])
    b.restore(*a.state())
    ta, ra = a.state()
    tb, rb = b.state()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.dumps(ra) == json.dumps(rb)


def test_cadence_setting(monkeypatch):
    monkeypatch.delenv("SDML_CHECKPOINT_EVERY", raising=False)
    assert default_every_s() == 60
    monkeypatch.setenv("SDML_CHECKPOINT_EVERY", "0")
    assert default_every_s() == 0
    monkeypatch.setenv("SDML_CHECKPOINT_EVERY", "soon")
    with pytest.raises(ValueError, match="SDML_CHECKPOINT_EVERY"):
        default_every_s()
