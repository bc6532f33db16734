"""What the tests (and the benchmarks' GPU check) share: the device axis and the CUDA marker,
the small run configs of the command-line tests, and the builders of training tasks.

Test files import it as ``helpers`` (pytest puts tests/ on the path); no test file imports
another test file or conftest.
"""

from __future__ import annotations

import pytest
import torch

CUDA_REASON = "no CUDA device on this machine (the GPU check script runs these on a GPU host)"

#: Marks of a test that needs a CUDA device: it carries the ``cuda`` marker and skips, with the
#: reason, where no GPU is present.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)]

# Device axis of the test products: the CUDA cases skip with a reason when no GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def requires_cuda(test):
    """Decorator: the test needs a CUDA device (see CUDA_MARKS)."""
    for mark in reversed(CUDA_MARKS):
        test = mark(test)
    return test


# ---- command-line runs --------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def run_config(dataset_options: dict | None = None, **settings) -> str:
    """The TOML text of a `--config` file for a small, fast training run (flat settings, then the
    [dataset_options] table), written once here for every test that starts one."""
    lines = [f"{name} = {_toml_value(value)}" for name, value in settings.items()]
    if dataset_options:
        lines += ["", "[dataset_options]"] + [f"{name} = {_toml_value(v)}" for name, v in dataset_options.items()]
    return "\n".join(lines) + "\n"


# The command-line tests' run: small networks keep every run to seconds; serial avoids the worker
# start-up cost (the parallel path is covered by test_train_strategies.py and the default run).
CONFIG = run_config(
    {"n_train": 150, "n_val": 50, "n_test": 60, "n_classes": 5},
    strategy="serial", epochs=4, hidden=[64, 64], code_dim=32, lr=[1e-3], batch_size=50,
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """A --config file of CONFIG (import it into a test module to use it as a fixture)."""
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(CONFIG)
    return str(path)


def run_main(main, argv, capsys):
    """(exit status, stdout, stderr) of a command line's main(argv) run as the runner runs it."""
    from sdml_ext import cli

    code = cli.run(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- training tasks -----------------------------------------------------------------------------

#: Network and batch of the tests' small trainings (the defaults are the paper's 1024-1024-512).
SMALL_NET = {"hidden": (48, 48), "code_dim": 16, "batch_size": 50}


def tasks_for(ds, **options):
    """One training task per modality of dataset `ds`, with TrainOptions(**options) and the P
    drawn from their seed."""
    from sdml_ext.engine.training import TrainOptions, make_tasks
    from sdml_ext.model import make_projection

    opts = TrainOptions(**options)
    return make_tasks(list(ds), make_projection(opts.code_dim, ds.num_classes, opts.seed), opts)


def small_tasks(ds, **options):
    """:func:`tasks_for` with the small network of SMALL_NET (options override it)."""
    return tasks_for(ds, **{**SMALL_NET, **options})


# ---- retrieval data ---------------------------------------------------------------------------


def class_structured(nq, ng, d, kind, seed, dtype=torch.float64, device="cpu"):
    """Embeddings near per-class centers; labels with unlabelled (-1 / all-zero) entries."""
    gen = torch.Generator().manual_seed(seed)
    classes = {"class_ids": 5, "multi_hot": 7, "multi_hot_wide": 80}[kind]
    centers = torch.randn(classes, d, generator=gen, dtype=torch.float64)

    def side(n):
        if kind == "class_ids":
            labels = torch.randint(0, classes, (n,), generator=gen)
            emb = centers[labels] + 1.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
            labels[torch.rand(n, generator=gen) < 0.1] = -1
        else:
            labels = (torch.rand(n, classes, generator=gen) < 2.0 / classes).long()
            labels[torch.rand(n, generator=gen) < 0.1] = 0
            emb = labels.double() @ centers + 1.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        return emb.to(dtype=dtype, device=device), labels.to(device)

    (q, ql), (g, gl) = side(nq), side(ng)
    return q, g, ql, gl
