"""The ranking metrics' exact ranks (csrc/cpu/retrieval/relevant_ranker.h and its parts) on awkward
rows, through both code paths of the CPU kernels: AVX-512 (where the CPU has it) and portable
(SDML_CPU_AVX512=off, read when a call makes its rankers), in float32 and float64.

The embeddings have exact cosines in either dtype and any summation order: rows of d = 256
entries +-1 times a power of two normalize to +-1/16, so every cosine is an exact multiple of
1/256. So the numpy reference's ranking (retrieval_reference.py) is the kernels' ranking, and the
ranks are compared exactly: precision_at_k at every cutoff gives the hits within each rank."""

import numpy as np
import pytest
import torch

from sdml_ext.ops import average_precision, average_precision_pair, precision_at_k, precision_recall_curve

import retrieval_reference as ref
from helpers import cpu_kernels  # noqa: F401 (fixture: AVX-512 and portable paths)

D = 256
DTYPES = [torch.float32, torch.float64]
LEVELS = [0.0, 0.2, 0.5, 0.9, 1.0]


def exact_rows(n, gen, classes=4, flip=0.3, patterns=None):
    """Rows of +-1 near per-class sign patterns (each sign flipped with probability `flip`),
    scaled by powers of two; their class ids."""
    if patterns is None:
        patterns = torch.randint(0, 2, (classes, D), generator=gen).double() * 2 - 1
    labels = torch.randint(0, patterns.shape[0], (n,), generator=gen)
    flips = torch.where(torch.rand(n, D, generator=gen) < flip, -1.0, 1.0).double()
    scale = 2.0 ** torch.randint(-3, 4, (n, 1), generator=gen).double()
    return patterns[labels] * flips * scale, labels


def check_all(q, g, ql, gl, dtype, exclude_self=False):
    """Every rank exact (precision_at_k at every cutoff), AP at all and within k, curves."""
    q, g = q.to(dtype), g.to(dtype)
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    ranked = g.shape[0] - (1 if exclude_self else 0)
    ks = list(range(1, max(ranked, 1) + 1))
    np.testing.assert_array_equal(precision_at_k(q, g, ql, gl, ks, exclude_self=exclude_self).numpy(),
                                  ref.precision_at_k(scores, rel, ks, exclude_self=exclude_self))
    for k in (None, 3):
        for divisor in ("retrieved", "relevant"):
            np.testing.assert_allclose(
                average_precision(q, g, ql, gl, k, divisor=divisor, exclude_self=exclude_self).numpy(),
                ref.average_precision(scores, rel, k, divisor, exclude_self=exclude_self), rtol=0, atol=1e-12)
    np.testing.assert_allclose(precision_recall_curve(q, g, ql, gl, LEVELS, exclude_self=exclude_self).numpy(),
                               ref.precision_recall(scores, rel, LEVELS, exclude_self=exclude_self), rtol=0, atol=1e-12)


# (Nq, Ng): one query; fewer items than one vector step, than the 64 buckets, and just past them;
# several item chunks (256) and vector tails; several query tiles.
SIZES = [(1, 1), (1, 5), (1, 63), (3, 64), (2, 65), (7, 300), (40, 1000), (5, 4097)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_ranks_exact(size, dtype, cpu_kernels):
    nq, ng = size
    gen = torch.Generator().manual_seed(nq * 7919 + ng)
    patterns = torch.randint(0, 2, (4, D), generator=gen).double() * 2 - 1
    q, ql = exact_rows(nq, gen, patterns=patterns)
    g, gl = exact_rows(ng, gen, patterns=patterns)
    check_all(q, g, ql, gl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_same_sample_exclude_self(exclude_self, dtype, cpu_kernels):
    gen = torch.Generator().manual_seed(31)
    x, labels = exact_rows(500, gen, flip=0.2)
    check_all(x, x.clone(), labels, labels.clone(), dtype, exclude_self=exclude_self)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_all_scores_equal(exclude_self, dtype, cpu_kernels):
    """Every gallery row the same direction: one score, ranks by ascending index."""
    gen = torch.Generator().manual_seed(5)
    row = torch.randint(0, 2, (1, D), generator=gen).double() * 2 - 1
    g = row * 2.0 ** torch.randint(-2, 3, (300, 1), generator=gen).double()
    gl = torch.randint(0, 3, (300,), generator=gen)
    q, ql = (g.clone(), gl.clone()) if exclude_self else (-row.repeat(4, 1), torch.tensor([0, 1, 2, 1]))
    check_all(q, g, ql, gl, dtype, exclude_self=exclude_self)


@pytest.mark.parametrize("dtype", DTYPES)
def test_few_distinct_scores(dtype, cpu_kernels):
    """Flips of one pattern by few signs: a handful of score values, thousands of ties each, the
    relevant items crowding their buckets."""
    gen = torch.Generator().manual_seed(6)
    g, gl = exact_rows(3000, gen, classes=2, flip=0.004)
    q, ql = exact_rows(6, gen, classes=2, flip=0.004)
    check_all(q, g, ql, gl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_crowded_bucket_of_distinct_scores(dtype, cpu_kernels):
    """A relevant item scoring -1 stretches the relevant range, so that the other relevant items'
    distinct scores share few buckets (more than a bucket keeps unsorted), with items that are not
    relevant between them."""
    gen = torch.Generator().manual_seed(8)
    q, _ = exact_rows(1, gen, classes=1, flip=0.0)
    g, _ = exact_rows(120, gen, classes=1, flip=0.0)
    g = g * torch.where(torch.rand(120, D, generator=gen) < 0.1, -1.0, 1.0).double()  # scores 0.6-1
    g[7] = -q[0]  # score -1
    gl = torch.randint(0, 2, (120,), generator=gen)
    gl[7] = 1
    check_all(q, g, torch.tensor([1]), gl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relevant", ["none", "one", "all", "one below all", "one above all"])
def test_relevant_sets(relevant, dtype, cpu_kernels):
    gen = torch.Generator().manual_seed(9)
    q, _ = exact_rows(3, gen, classes=1, flip=0.3)
    g, _ = exact_rows(700, gen, classes=1, flip=0.3)
    scores = ref.cosine_scores(q, g)
    gl = torch.zeros(700, dtype=torch.long)
    if relevant == "none":
        ql = torch.tensor([1, 2, -1])
    elif relevant == "all":
        ql = torch.zeros(3, dtype=torch.long)
    else:  # one relevant item per query: in the middle, the lowest or the highest score
        pick = {"one": lambda s: np.argsort(s)[len(s) // 2], "one below all": np.argmin, "one above all": np.argmax}
        ql = torch.arange(1, 4)
        for i in range(3):
            gl[int(pick[relevant](scores[i]))] = i + 1
    check_all(q, g, ql, gl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, cpu_kernels):
    gen = torch.Generator().manual_seed(10)
    q, ql = exact_rows(9, gen)
    g, gl = exact_rows(400, gen)
    wide = torch.zeros(400, 2 * D, dtype=torch.float64)
    wide[:, ::2] = g
    want = average_precision(q.to(dtype), g.to(dtype), ql, gl)
    got = average_precision(q.to(dtype).t().contiguous().t(), wide.to(dtype)[:, ::2], ql, gl)
    assert torch.equal(got, want)
    check_all(q.t().contiguous().t(), wide[:, ::2], ql, gl, dtype)


@pytest.mark.parametrize("classes", [7, 80, 150])  # one, two and three label words
@pytest.mark.parametrize("ng", [1, 13, 1003])
def test_multi_label_relevance(ng, classes, cpu_kernels):
    gen = torch.Generator().manual_seed(ng + classes)
    g, _ = exact_rows(ng, gen)
    q, _ = exact_rows(6, gen)
    gl = (torch.rand(ng, classes, generator=gen) < 2.0 / classes).long()
    ql = (torch.rand(6, classes, generator=gen) < 2.0 / classes).long()
    ql[0] = 0  # no label: nothing relevant
    ql[1, -1] = 1  # the last label word in use
    check_all(q, g, ql, gl, torch.float32)


def test_paths_agree_on_rounded_scores(monkeypatch):
    """Random float32 embeddings (scores with rounding, near-ties): both paths rank alike, and the
    pair of directions agrees with two calls."""
    gen = torch.Generator().manual_seed(12)
    q, g = torch.randn(300, 64, generator=gen), torch.randn(2000, 64, generator=gen)
    ql, gl = torch.randint(0, 10, (300,), generator=gen), torch.randint(0, 10, (2000,), generator=gen)
    results = []
    for portable in (False, True):
        if portable:
            monkeypatch.setenv("SDML_CPU_AVX512", "off")
        else:
            monkeypatch.delenv("SDML_CPU_AVX512", raising=False)
        ks = [1, 10, 100, 1000, 2000]
        results.append((average_precision(q, g, ql, gl), precision_at_k(q, g, ql, gl, ks),
                        precision_recall_curve(q, g, ql, gl, LEVELS), *average_precision_pair(q, g, ql, gl)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[0][3], results[0][0])


PACKED = """
import sys, torch
from sdml_ext.ops import average_precision, precision_at_k
torch.set_num_threads(int(sys.argv[1]))
gen = torch.Generator().manual_seed(13)
q, g = torch.randn(305, 48, generator=gen), torch.randn(1500, 48, generator=gen)
ql, gl = torch.randint(0, 6, (305,), generator=gen), torch.randint(0, 6, (1500,), generator=gen)
torch.save((average_precision(q, g, ql, gl), precision_at_k(q, g, ql, gl, [1, 50, 1500])), sys.argv[2])
"""


@pytest.mark.parametrize("gemm", ["blas", "onednn", "avx2"])
def test_thread_count_cuts_tiles_without_changing_results(gemm, tmp_path):
    """1, 2 and 5 threads cut 305 queries into tiles of 77, 39 and 16 rows (the last of 74, 32 and
    1 row): the float32 results are bitwise the same, with the gallery packed once
    (SDML_CPU_GEMM=blas, where torch's MKL has the packed GEMM), with oneDNN blocks and with our
    AVX2 kernel."""
    import os
    import subprocess
    import sys

    results = []
    for threads in (1, 2, 5):
        out = tmp_path / f"{threads}.pt"
        env = dict(os.environ, SDML_CPU_GEMM=gemm, SDML_CACHE_DIR="off")
        subprocess.run([sys.executable, "-P", "-c", PACKED, str(threads), str(out)], env=env, check=True)
        results.append(torch.load(out))
    for ap, prec in results[1:]:
        assert torch.equal(ap, results[0][0]) and torch.equal(prec, results[0][1])


def test_gallery_past_32_bit_counts_is_refused():
    """The ranker counts items in 32 bits: 2^31 gallery rows (a view, nothing allocated) are a
    ValueError naming the argument, before any work."""
    g = torch.ones(1, 1).expand(2**31, 1)
    gl = torch.zeros(1, dtype=torch.long).expand(2**31)
    q, ql = torch.ones(2, 1), torch.zeros(2, dtype=torch.long)
    for call, name in ((lambda: average_precision(q, g, ql, gl), "average_precision: gallery"),
                       (lambda: precision_at_k(q, g, ql, gl, [1]), "precision_at_k: gallery"),
                       (lambda: precision_recall_curve(q, g, ql, gl, [0.5]), "precision_recall_curve: gallery"),
                       (lambda: average_precision_pair(q, g, ql, gl), "average_precision_pair: b")):
        with pytest.raises(ValueError, match=f"{name} has 2147483648 rows"):
            call()
