"""Readying a device before a run: names are checked, and a GPU this process has not touched yet
is initialised before anything (peak-memory statistics first of all) is asked of it.

The CUDA runtime cannot be run here, so `fake_cuda` stands in for torch.cuda the way a fresh
process on a GPU host behaves: ``reset_peak_memory_stats`` raises "Invalid device argument" until
CUDA has been initialised (what every training strategy hit on an H200). The trainers themselves
run on the CPU under it, so each strategy's own device handling is what is tested."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

import sdml_ext
from sdml_ext.engine import strategies
from sdml_ext.data import make_synthetic
from sdml_ext.devices import parse_device, ready_device, ready_devices
from sdml_ext.model import make_projection
from sdml_ext.engine.strategies import STRATEGIES, train_tasks
from sdml_ext.engine.training import ModalityTrainer, TrainOptions, make_tasks


class FakeCuda:
    """torch.cuda of a one-GPU host in a process that has not yet used the GPU."""

    def __init__(self):
        self.initialized = False
        self.calls = []

    def init(self):
        self.calls.append("init")
        self.initialized = True

    def synchronize(self, device=None):
        self.calls.append(f"synchronize {device}")

    def reset_peak_memory_stats(self, device=None):
        self.calls.append(f"reset {device}")
        if not self.initialized:  # the caching allocator has no state for any device yet
            raise RuntimeError("Invalid device argument")

    def max_memory_allocated(self, device=None):
        if not self.initialized:
            raise RuntimeError("Invalid device argument")
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("init", "synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # What parallel-on-streams asks of torch.cuda besides the above.
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(synchronize=lambda: None))
    # The trainers run on the CPU: what is tested is the run's handling of the device. (Adam
    # asks the accelerator whether a graph is being captured; the CPU trainers have none.)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False, raising=False)
    monkeypatch.setattr(strategies, "ModalityTrainer", lambda task, device: ModalityTrainer(task, "cpu"))
    return fake


def _tasks():
    ds = make_synthetic(2, dims=[12, 8], n_train=[60, 40], n_val=20, n_test=10, n_classes=3, seed=1)
    opts = TrainOptions(hidden=(8,), code_dim=4, batch_size=20, epochs=1)
    return make_tasks(ds, make_projection(opts.code_dim, ds.num_classes, opts.seed), opts)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_initialises_a_fresh_gpu_before_resetting_its_statistics(fake_cuda, strategy):
    report = train_tasks(_tasks(), strategy, devices=["cuda:0"])
    assert [r.name for r in report.modalities] == ["m0", "m1"]
    assert report.devices[0] == "cuda:0" and report.device_peak_bytes == {"cuda:0": 0}
    first_reset = next(i for i, c in enumerate(fake_cuda.calls) if c.startswith("reset"))
    assert "init" in fake_cuda.calls[:first_reset]


def test_two_entries_for_one_gpu_share_it(fake_cuda):
    report = train_tasks(_tasks(), "parallel", devices=["cuda:0", "cuda:0"])
    assert set(report.plan["assignment"].values()) == {"cuda:0"}


def test_ready_device_names_the_device_explicitly(fake_cuda):
    assert ready_device("cuda") == torch.device("cuda", 0)
    assert ready_devices(["cuda:0", "cpu"]) == ["cuda:0", "cpu"]
    assert fake_cuda.calls == ["init", "synchronize cuda:0"] * 2  # no reset unless asked
    ready_device("cuda:0", reset_peak=True)
    assert fake_cuda.calls[-1] == "reset cuda:0"
    with pytest.raises(ValueError, match=r"no such CUDA device 'cuda:1': this machine has 1"):
        ready_device("cuda:1")


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "device 'gpu' is not a device"), ("cuda:x", "device 'cuda:x' is not a device"),
     ("meta", "only cpu and CUDA devices")],
)
def test_bad_device_names_are_refused_with_the_name(device, message):
    with pytest.raises(ValueError, match=message):
        parse_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a host without CUDA")
def test_cuda_without_cuda_says_so(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available here"):
        ready_device("cuda:0")
    with pytest.raises(ValueError, match="CUDA is not available here"):
        sdml_ext.load(tmp_path, "cuda:0")  # the device is checked before the bundle is read
    assert parse_device("cpu") == torch.device("cpu")
