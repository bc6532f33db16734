"""joint / serial / parallel give the same models; failures stop the run; time and memory."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import requires_cuda, small_tasks

from sdml_ext.data import make_synthetic
from sdml_ext.engine.strategies import STRATEGIES, WorkerError, _assign_devices, _thread_share, train_tasks


def make(ds, **options):
    return small_tasks(ds, **{"epochs": 3, **options})


@pytest.fixture(scope="module")
def runs():
    # Different sizes and widths, so the joint loop has modalities dropping out mid-epoch.
    ds = make_synthetic(3, dims=[40, 24, 8], n_train=[250, 150, 200], n_val=40, n_test=40, n_classes=5, seed=2)
    tasks = make(ds)
    return {s: train_tasks(tasks, s, cores=2) for s in STRATEGIES}


def test_all_strategies_give_the_same_models(runs):
    reference = runs["serial"].modalities
    for strategy in ("joint", "parallel"):
        for a, b in zip(reference, runs[strategy].modalities):
            assert (a.name, a.index, a.best_epoch) == (b.name, b.index, b.best_epoch)
            assert a.state.keys() == b.state.keys()
            for key in a.state:
                # Same seeds, same steps; only the thread count (BLAS blocking) may differ.
                np.testing.assert_allclose(a.state[key], b.state[key], rtol=1e-4, atol=1e-6, err_msg=f"{strategy} {a.name} {key}")
            np.testing.assert_allclose([s.train_loss for s in a.history], [s.train_loss for s in b.history], rtol=1e-4)


def test_reports_time_and_memory(runs):
    for strategy, report in runs.items():
        assert report.strategy == strategy and report.wall_s > 0 and report.peak_rss_bytes > 0
        assert [r.name for r in report.modalities] == ["m0", "m1", "m2"]
        for r in report.modalities:
            assert r.time_s > 0 and r.cpu_s > 0 and r.state_bytes > 0
        assert "whole run" in report.table()
    parallel = runs["parallel"]
    assert parallel.plan["workers"] == 2 and parallel.plan["threads_per_worker_at_start"] == 1
    assert all(r.peak_memory_bytes > 0 and r.device.startswith("cpu (worker") for r in parallel.modalities)
    # Longest (costliest) modality first, so the last ones fill in the gaps.
    assert parallel.plan["order"][0] == "m0"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_failing_modality_stops_the_run_with_its_error(strategy):
    ds = make_synthetic(2, n_train=[120, 20], n_val=20, n_test=20, n_classes=4)
    with pytest.raises(WorkerError, match=r"modality 'm1' failed: .*fewer than the batch size"):
        train_tasks(make(ds), strategy, cores=2)


def test_bad_strategy_and_devices():
    ds = make_synthetic(2, n_train=100, n_val=20, n_test=20, n_classes=4)
    with pytest.raises(ValueError, match="unknown strategy"):
        train_tasks(make(ds), "fast")
    with pytest.raises(ValueError, match="devices"):
        train_tasks(make(ds), "serial", devices=["cpu", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train_tasks(make(ds), "parallel", devices=["cuda:0"])


def test_devices_are_balanced_by_cost():
    ds = make_synthetic(4, dims=[400, 10, 10, 10], n_train=100, n_val=10, n_test=10, n_classes=3)
    assignment = _assign_devices(make(ds), ["cuda:0", "cuda:1"])
    assert assignment[0] != assignment[1] and {assignment[2], assignment[3]} == {assignment[1]}


def test_cores_are_shared_between_live_workers_never_oversubscribed():
    assert [_thread_share(2, SimpleNamespace(value=n)) for n in (2, 1, 0)] == [1, 2, 2]
    assert [_thread_share(16, SimpleNamespace(value=n)) for n in (6, 5, 3, 1)] == [2, 3, 5, 16]
    assert all(_thread_share(c, SimpleNamespace(value=n)) * n <= c for c in (2, 4, 16) for n in range(1, c + 1))


@requires_cuda
def test_cuda_strategies_match_the_cpu_models():
    ds = make_synthetic(3, n_train=200, n_val=40, n_test=40, n_classes=5, seed=4)
    tasks = make(ds)
    cpu = train_tasks(tasks, "serial")
    for strategy in STRATEGIES:  # parallel: one stream per modality on one device
        report = train_tasks(tasks, strategy, devices=["cuda:0"])
        assert report.device_peak_bytes["cuda:0"] > 0
        if strategy == "serial":  # one modality at a time: the run's peak is the largest of theirs
            assert report.device_peak_bytes["cuda:0"] == max(r.peak_memory_bytes for r in report.modalities)
        for a, b in zip(cpu.modalities, report.modalities):
            # Different kernels and summation orders: the same trajectory, not the same bits.
            for field in ("train_loss", "val_loss"):
                np.testing.assert_allclose([getattr(s, field) for s in a.history], [getattr(s, field) for s in b.history],
                                           rtol=2e-3, err_msg=f"{strategy} {a.name} {field}")
