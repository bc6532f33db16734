"""Helpers for tests that start, stop and kill training runs in subprocesses: each run in its own
process group, so that everything it started can be found (a /proc scan) and nothing outlives
the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

TRAIN = [sys.executable, "-m", "sdml_ext.train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# A run of a few seconds: 3 small synthetic modalities, 4 epochs, a checkpoint after every epoch.
SMALL_RUN = """
dataset = "synthetic"
epochs = 4
hidden = [48, 48]
code_dim = 16
lr = [1e-3]
batch_size = 50

[dataset_options]
n_train = 150
n_val = 50
n_test = 60
n_classes = 5
n_modalities = 3
"""
EVERY_EPOCH = {"SDML_CHECKPOINT_EVERY": "0", "OMP_NUM_THREADS": "1"}


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def wait_group_gone(pgid: int, timeout_s: float = 15) -> list[int]:
    """Wait until no process of the group is left; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Run:
    """A subprocess in its own session (process group = its pid), killed with its group on exit."""

    def __init__(self, argv, cwd, env=None, pause_at=None):
        self.env = {**os.environ, **(env or {})}
        self.flag = Path(cwd) / f"pause-{time.monotonic_ns()}"
        if pause_at:
            self.env.update(SDML_TEST_PAUSE_AT=pause_at, SDML_TEST_PAUSE_FILE=str(self.flag))
        self.proc = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)

    def wait_paused(self, timeout_s: float = 240) -> int:
        """Wait until a process of the run reached the pause point; its pid."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.flag.exists() and self.flag.read_text():
                return int(self.flag.read_text())
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended ({self.proc.returncode}) before pausing:\n{self.proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError("the run never reached its pause point")

    def release(self) -> None:
        self.flag.unlink(missing_ok=True)

    def finish(self, timeout_s: float = 300) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        kill_group(self.proc.pid)
        self.proc.kill()
        self.proc.communicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_bundle(a: Path, b: Path) -> None:
    """Two bundles hold the same models tensor for tensor, the same kept epochs, losses and metrics."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [m["name"] for m in ma["modalities"]] == [m["name"] for m in mb["modalities"]]
    for ea, eb in zip(ma["modalities"], mb["modalities"]):
        ta, tb = load_file(str(a / ea["file"])), load_file(str(b / eb["file"]))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert np.array_equal(ta[key], tb[key]), f"{ea['name']} {key}"
        # Not the files' sha256: safetensors writes the header's metadata in a per-process random
        # (hash map) order, so two identical runs' files differ in those bytes.
        for field in ("best_epoch", "selection", "history"):
            assert ea["training"][field] == eb["training"][field], f"{ea['name']} {field}"
    assert ma["metrics"] == mb["metrics"]
    assert load_file(str(a / "projection.safetensors"))["P"].tobytes() == load_file(str(b / "projection.safetensors"))["P"].tobytes()
