"""Who is to blame: a modality that fails because of its data is a user error (exit 2); a
worker that crashes or dies is not (exit 1, traceback only with SDML_DEBUG). And the error and
record types live where readers of results reach them without the training machinery."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import tasks_for

from sdml_ext import cli
from sdml_ext.data import make_synthetic
from sdml_ext.errors import BundleError, ModalityError, WorkerCrash, WorkerError
from sdml_ext.engine.strategies import train_tasks

TINY = {"hidden": (16,), "code_dim": 8, "batch_size": 20, "epochs": 2}


def tasks(**options):
    ds = make_synthetic(2, dims=[12, 10], n_train=60, n_val=20, n_test=20, n_classes=4, seed=5)
    return tasks_for(ds, **{**TINY, **options})


@pytest.mark.parametrize("strategy", ["serial", "parallel"])
def test_bad_data_is_a_modality_error(strategy):
    bad = tasks()
    bad[1].train_x = bad[1].train_x[:5]  # fewer rows than the batch size
    bad[1].train_y = bad[1].train_y[:5]
    with pytest.raises(ModalityError, match="modality 'm1' failed: ValueError: .*fewer than the batch size"):
        train_tasks(bad, strategy, cores=2)


def test_an_unexpected_exception_in_a_worker_is_a_crash_with_its_traceback():
    bad = tasks()
    bad[0].train_y = np.array(["a"] * bad[0].train_x.shape[0])  # torch cannot take strings: TypeError
    with pytest.raises(WorkerCrash, match="modality 'm0' failed: TypeError") as info:
        train_tasks(bad, "parallel", cores=2)
    assert "Traceback" in info.value.detail and "Traceback" not in str(info.value)
    assert not isinstance(info.value, ModalityError) and isinstance(info.value, WorkerError)


def test_a_killed_worker_is_a_crash():
    killed = []

    def kill_one(stats):
        if not killed:
            victim = mp.active_children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    with pytest.raises(WorkerCrash, match="died with exit code -9"):
        train_tasks(tasks(epochs=200), "parallel", on_epoch=kill_one, cores=2)
    assert killed


def _raiser(exc):
    def main(argv):
        raise exc

    return main


def test_cli_exit_codes_by_blame(capsys, monkeypatch):
    monkeypatch.delenv("SDML_DEBUG", raising=False)
    crash = WorkerCrash("modality 'x' failed: RuntimeError: boom", detail="Traceback (most recent call last): ...")
    assert cli.run(_raiser(crash), []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crashed" in err and "boom" in err and "Traceback" not in err
    for user in (ModalityError("modality 'x' failed: ValueError: bad"), BundleError("not a bundle")):
        assert cli.run(_raiser(user), []) == 2
        assert capsys.readouterr().err.startswith("error: ")
    monkeypatch.setenv("SDML_DEBUG", "1")
    with pytest.raises(WorkerCrash):
        cli.run(_raiser(crash), [])
    assert "Traceback (most recent call last): ..." in capsys.readouterr().err


class _Writes:
    """A stderr that records each write call."""

    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("exc, status", [(KeyboardInterrupt(), 130), (BundleError("not a bundle"), 2),
                                         (WorkerCrash("modality 'x' failed"), 1)])
def test_each_line_is_one_write(monkeypatch, exc, status):
    """The ranks of a distributed job share one stderr: each line (text and newline) must go out
    in one write, or two ranks' lines run together (print writes the newline separately)."""
    monkeypatch.delenv("SDML_DEBUG", raising=False)
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert cli.run(_raiser(exc), []) == status
    assert len(stderr.calls) == 1 and stderr.calls[0].endswith("\n") and stderr.calls[0].count("\n") == 1, stderr.calls


def test_evaluating_needs_no_training_machinery(tmp_path):
    code = ("import sys, sdml_ext.evaluate, sdml_ext.store.bundle; "
            "print(' '.join(m for m in sys.modules if m.startswith(('sdml_ext.', 'multiprocessing'))))")
    # cwd outside the repository: import the installed package, not the source tree.
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=tmp_path).stdout.split()
    assert {"sdml_ext.evaluate", "sdml_ext.eval.evaluation", "sdml_ext.store.bundle"} <= set(loaded)
    engine = {"sdml_ext.engine.strategies", "sdml_ext.engine.training", "sdml_ext.engine.config",
              "sdml_ext.engine.records", "sdml_ext.engine.flows", "sdml_ext.engine.distributed"}
    assert not engine & set(loaded)
