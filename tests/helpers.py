"""What the tests (and the benchmarks' GPU check) share: the device axis and the CUDA marker,
the small run configs of the command-line tests, the builders of training tasks, and the
contract of cosine_topk's CPU precision modes.

Test files import it as ``helpers`` (pytest puts tests/ on the path); no test file imports
another test file or conftest.
"""

from __future__ import annotations

import contextlib
import os

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


# ---- cosine_topk's precision modes on the CPU -----------------------------------------------------


# The top-k GEMMs whose rounding does not depend on a product's place in the output.
POSITION_FREE_GEMMS = ("onednn", "avx2")
# Every choice SDML_CPU_GEMM can force (one falls back to blas where this machine lacks it).
CPU_GEMMS = ("blas", "onednn", "avx2")


def topk_gemm() -> str:
    """The GEMM of the exact mode's top-k blocks in this process (sdml/cpu_gemm.h): oneDNN and our
    AVX2 kernel round a product the same wherever it lies in the output, so "bf16" re-scores to
    the exact mode's bits; MKL/BLAS rounds by position, so there an id may differ between items
    whose float32 scores lie within the GEMM's rounding of each other, and a score by that rounding.
    (Asked on first use: the choice may time them all.)"""
    import sdml_ext

    return sdml_ext.build_info()["cpu_gemm"]["gemm"]


@contextlib.contextmanager
def float32_kernel_alone():
    """cosine_topk's exact mode as its float32 kernel alone: without the bf16 filter it takes on
    large galleries where the CPU has bf16 units (the reference the filter must equal)."""
    old = os.environ.get("SDML_CPU_EXACT_FILTER")
    os.environ["SDML_CPU_EXACT_FILTER"] = "off"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SDML_CPU_EXACT_FILTER"]
        else:
            os.environ["SDML_CPU_EXACT_FILTER"] = old


def both(q, g, k, exclude_self=False):
    from sdml_ext.ops import cosine_topk

    with float32_kernel_alone():
        exact = cosine_topk(q, g, k, exclude_self=exclude_self)
    fast = cosine_topk(q, g, k, exclude_self=exclude_self, precision="bf16")
    return exact, fast


def assert_same(exact, fast):
    assert torch.equal(fast.indices, exact.indices)
    assert torch.equal(fast.scores, exact.scores)
    assert fast.scores.dtype == exact.scores.dtype and fast.indices.dtype == torch.int64


def assert_same_up_to_gemm_rounding(q, g, k, exclude_self=False):
    """The contract of both modes in this process: bitwise where the top-k GEMM is oneDNN or ours (and
    where "bf16" runs the exact mode: float64, 1-2 queries); else the same ids and scores but
    where two items' scores lie within the float32 GEMM's rounding of each other."""
    exact, fast = both(q, g, k, exclude_self)
    if topk_gemm() in POSITION_FREE_GEMMS or q.dtype == torch.float64 or q.shape[0] < 3:
        assert_same(exact, fast)
        return
    assert fast.scores.dtype == exact.scores.dtype and fast.indices.dtype == torch.int64
    d = q.shape[1]
    bound = 2 * (d + 2) * 2.0**-24  # two float32 dot products of unit vectors, each within (d+2) u
    assert (fast.scores - exact.scores).abs().max() <= bound
    true = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T
    differ = fast.indices != exact.indices
    assert (true.gather(1, fast.indices) - true.gather(1, exact.indices))[differ].abs().le(2 * bound).all()
    assert all(len(set(row.tolist())) == k for row in fast.indices)  # distinct ids
    if exclude_self:
        assert not (fast.indices == torch.arange(q.shape[0]).unsqueeze(1)).any()


def near_ties(n_heads=60, variants=12, n_random=3000, d=256, seed=0):
    """A gallery whose best items per query are clusters of near-identical rows: each head is
    repeated with a 1-ulp nudge of one or a few coordinates (float32 scores a few ulps apart, often
    equal) and exactly (duplicates), among random rows; queries lie near the heads."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.randn(n_heads, d, generator=g)
    rows = [torch.randn(n_random, d, generator=g)]
    for h in heads:
        block = h.repeat(variants, 1)
        for v in range(1, variants):
            if v % 4 == 0:
                continue  # exact duplicate of the head
            cols = torch.randint(0, d, (v % 3 + 1,), generator=g)
            block[v, cols] = torch.nextafter(block[v, cols], torch.full_like(block[v, cols], float("inf")))
        rows.append(block)
    gallery = torch.cat(rows)
    gallery = gallery[torch.randperm(gallery.shape[0], generator=g)]  # ties spread over the blocks
    queries = heads + 0.05 * torch.randn(n_heads, d, generator=g)
    return queries, gallery


@pytest.fixture(params=["native", "portable"])
def cpu_kernels(request, monkeypatch):
    """Runs a test through the CPU kernels' hand-written AVX-512 paths ("native", where the CPU has
    AVX-512) and through their portable code (SDML_CPU_AVX512=off, read when a call starts: both
    run in one process, on any machine)."""
    if request.param == "portable":
        monkeypatch.setenv("SDML_CPU_AVX512", "off")
    else:
        monkeypatch.delenv("SDML_CPU_AVX512", raising=False)
    return request.param
