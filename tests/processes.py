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
from helpers import run_config

TRAIN = [sys.executable, "-m", "sdml_ext.train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# A run of a few seconds: 3 small synthetic modalities, 4 epochs, a checkpoint after every epoch.
SMALL_RUN = run_config(
    {"n_train": 150, "n_val": 50, "n_test": 60, "n_classes": 5, "n_modalities": 3},
    dataset="synthetic", epochs=4, hidden=[48, 48], code_dim=16, lr=[1e-3], batch_size=50,
)
EVERY_EPOCH = {"SDML_CHECKPOINT_EVERY": "0", "OMP_NUM_THREADS": "1"}


def members(marker: str) -> list[int]:
    """Live processes whose environment carries SDML_TEST_RUN=marker: everything a run started,
    whatever session or process group it put itself in (torchrun starts each rank in its own)."""
    needle = f"SDML_TEST_RUN={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if state != "Z" and needle in environ:
            found.append(int(entry))
    return found


def pymp_dirs() -> set[str]:
    """multiprocessing's temporary directories present now."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("pymp-*")}


def kill_all(marker: str) -> None:
    for pid in members(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Run:
    """A subprocess in its own session; on exit it and everything it started is killed."""

    def __init__(self, argv, cwd, env=None, pause_at=None):
        self.marker = f"{os.getpid()}-{time.monotonic_ns()}"
        self.env = {**os.environ, **(env or {}), "SDML_TEST_RUN": self.marker}
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

    def gone(self, timeout_s: float = 15) -> list[int]:
        """Wait until no process of the run is left; those still alive at the timeout."""
        deadline = time.monotonic() + timeout_s
        while (alive := members(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive

    def __exit__(self, *exc):
        kill_all(self.marker)
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
