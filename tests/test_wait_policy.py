"""The package chooses how idle OpenMP threads wait (passive) wherever it is started: the
command-line tools, torchrun ranks (started as ``python -m sdml_ext.train``), a program that
imports sdml_ext before torch, and the parallel strategy's workers even when the program imported
torch first; a value in the environment always wins. Checked on what the OpenMP runtime itself
read when it loaded (OMP_DISPLAY_ENV=VERBOSE makes libgomp print its settings to stderr)."""

import os
import re
import subprocess
import sys

import pytest

CLEAN = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def spin_counts(code_or_module: list[str], **env) -> list[int]:
    """GOMP_SPINCOUNT of every libgomp runtime the command loaded, in the order they printed."""
    done = subprocess.run([sys.executable, *code_or_module], capture_output=True, text=True, timeout=300,
                          env={**CLEAN, "OMP_DISPLAY_ENV": "VERBOSE", "PYTHONWARNINGS": "ignore", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    if "OPENMP DISPLAY ENVIRONMENT" not in done.stderr:
        pytest.fail("torch's OpenMP runtime printed no settings for OMP_DISPLAY_ENV; this test reads libgomp's")
    return [int(n) for n in re.findall(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)]


def test_the_command_line_tools_wait_passively():
    for module in ("sdml_ext.train", "sdml_ext.evaluate", "sdml_ext.search"):
        assert spin_counts(["-m", module, "--help"]) == [0], module


def test_the_environment_overrides_the_choice():
    assert spin_counts(["-m", "sdml_ext.train", "--help"], OMP_WAIT_POLICY="ACTIVE") == [30_000_000_000]
    assert spin_counts(["-m", "sdml_ext.train", "--help"], GOMP_SPINCOUNT="1234") == [1234]


def test_a_program_importing_sdml_ext_first_waits_passively():
    probe = "import sdml_ext, torch; print(sdml_ext.waitpolicy.describe())"
    assert spin_counts(["-c", probe]) == [0]


def test_workers_wait_passively_when_the_program_imported_torch_first():
    """torch first: the program's own runtime keeps its default spin (it cannot be changed once
    loaded; the README says so), but the parallel strategy's workers start fresh runtimes that
    read the policy sdml_ext put in the environment."""
    program = """
import torch, sdml_ext
from sdml_ext.data import make_synthetic
from sdml_ext.model import make_projection
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import TrainOptions, make_tasks
assert "torch was imported before sdml_ext" in sdml_ext.waitpolicy.describe()
ds = make_synthetic(2, n_train=100, n_val=20, n_test=20, n_classes=3, seed=0)
opts = TrainOptions(hidden=(16, 16), code_dim=8, batch_size=50, epochs=1)
train_tasks(make_tasks(ds, make_projection(8, 3, 0), opts), "parallel", cores=2)
"""
    counts = spin_counts(["-c", program])
    assert counts[0] == 300_000 and len(counts) >= 2 and set(counts[1:]) == {0}, counts
