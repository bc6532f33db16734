"""sdml retrieval ops against the numpy references in retrieval_reference.py: cosine_topk,
average_precision, precision_at_k, precision_recall_curve; ties, awkward sizes, opcheck, errors."""

import os
import numpy as np
import pytest
import torch

from torch._subclasses.fake_tensor import FakeTensorMode

from sdml_ext.ops import average_precision, average_precision_pair, cosine_topk, precision_at_k, precision_recall_curve

import retrieval_reference as ref
from helpers import DEVICES, class_structured, requires_cuda

# (Nq, Ng, d): single query, single gallery item, d = 1, Ng < k, and sizes that the CPU kernel's
# query tiles (16-256 rows, depending on the thread count) and gallery blocks (1024 columns) do
# not divide.
SIZES = [(1, 1, 1), (1, 7, 3), (5, 1, 4), (3, 4, 1), (300, 50, 8), (40, 5000, 16)]
CPU_DTYPES = [torch.float32, torch.float64]
LABEL_KINDS = ["class_ids", "multi_hot", "multi_hot_wide"]  # wide: 80 classes, two label words
LEVELS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0]


def tied(nq, ng, seed, dtype, device, d=16, classes=3):
    """Rows with four entries +-1 (scaled by powers of two): normalized entries are +-0.5 and every
    cosine is an exact multiple of 1/4 in any dtype and summation order, so ties are massive and
    exact. Same-sample query and gallery when nq == ng."""
    gen = torch.Generator().manual_seed(seed)

    def rows(n):
        x = torch.zeros(n, d, dtype=torch.float64)
        for i in range(n):
            x[i, torch.randperm(d, generator=gen)[:4]] = torch.randint(0, 2, (4,), generator=gen).double() * 2 - 1
        return x * 2.0 ** torch.randint(-3, 4, (n, 1), generator=gen).double()

    q = rows(nq)
    g = q.clone() if nq == ng else rows(ng)
    ql = torch.randint(-1, classes, (nq,), generator=gen)
    gl = ql.clone() if nq == ng else torch.randint(-1, classes, (ng,), generator=gen)
    return q.to(dtype=dtype, device=device), g.to(dtype=dtype, device=device), ql.to(device), gl.to(device)


def assert_close(ours, expected, atol=1e-12):
    ours = ours.cpu().numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=atol, equal_nan=True)


# ---- cosine_topk -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_topk_matches_reference_float64(size, device):
    nq, ng, d = size
    q, g, _, _ = class_structured(nq, ng, d, "class_ids", seed=nq + ng + d, device=device)
    scores = ref.cosine_scores(q, g)
    for k in sorted({1, min(5, ng), ng}):
        ours = cosine_topk(q, g, k)
        want_scores, want_idx = ref.topk(scores, k)
        assert ours.indices.dtype == torch.int64 and ours.scores.dtype == torch.float64
        assert np.array_equal(ours.indices.cpu().numpy(), want_idx)
        assert_close(ours.scores, want_scores)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_float32_within_rounding(device):
    q, g, _, _ = class_structured(37, 3000, 32, "class_ids", seed=4, dtype=torch.float32, device=device)
    scores = ref.cosine_scores(q, g)
    ours = cosine_topk(q, g, 100)
    want_scores, _ = ref.topk(scores, 100)
    idx = ours.indices.cpu().numpy()
    assert ours.scores.dtype == torch.float32
    assert all(len(set(row)) == 100 for row in idx)
    assert_close(ours.scores.double(), want_scores, atol=1e-5)
    # Every returned item really has the returned score (up to float32 rounding).
    assert_close(ours.scores.double(), np.take_along_axis(scores, idx, axis=1), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_topk_ties_by_ascending_index(exclude_self, dtype, device):
    q, g, _, _ = tied(300, 300, seed=1, dtype=dtype, device=device)
    scores = ref.cosine_scores(q, g)
    for k in (1, 17, 299):
        ours = cosine_topk(q, g, k, exclude_self=exclude_self)
        want_scores, want_idx = ref.topk(scores, k, exclude_self)
        assert np.array_equal(ours.indices.cpu().numpy(), want_idx)
        assert_close(ours.scores.double(), want_scores, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_topk_large_k(dtype):
    """k in the thousands: candidate buffers of 2k per row (fewer rows per tile past 16 MB)."""
    q, g, _, _ = class_structured(300, 6000, 8, "class_ids", seed=20, dtype=dtype)
    scores = ref.cosine_scores(q, g)
    ours = cosine_topk(q, g, 2500)
    want_scores, want_idx = ref.topk(scores, 2500)
    assert_close(ours.scores.double(), want_scores, atol=1e-5 if dtype == torch.float32 else 1e-12)
    if dtype == torch.float64:
        assert np.array_equal(ours.indices.numpy(), want_idx)
    else:  # float32 rounding may swap near-ties: the same items, each with its own score
        assert all(len(set(row)) == 2500 for row in ours.indices.numpy())
        assert_close(ours.scores.double(), np.take_along_axis(scores, ours.indices.numpy(), axis=1), atol=1e-5)


BLAS_PATH = """
import torch
from sdml_ext.ops import average_precision, cosine_topk
torch.manual_seed(0)
q, g = torch.randn(70, 20), torch.randn(3000, 20)
ql, gl = torch.randint(0, 4, (70,)), torch.randint(0, 4, (3000,))
top = cosine_topk(q, g, 40)
torch.save((top.scores, top.indices, average_precision(q, g, ql, gl)), {out!r})
"""


def test_float32_gemm_paths_agree(tmp_path):
    """float32 blocks go through the measured choice by default, through BLAS (at::mm_out), oneDNN
    or our AVX2 kernel when forced: all give the same rankings up to float32 rounding."""
    import os
    import subprocess
    import sys

    results = []
    for choice in ("", "blas", "onednn", "avx2"):
        out = tmp_path / f"gemm_{choice or 'default'}.pt"
        env = dict(os.environ, SDML_CPU_GEMM=choice)
        subprocess.run([sys.executable, "-P", "-c", BLAS_PATH.format(out=str(out))], env=env, check=True)
        results.append(torch.load(out))
    s1, i1, ap1 = results[0]
    for s2, i2, ap2 in results[1:]:
        torch.testing.assert_close(s1, s2, rtol=0, atol=1e-6)
        assert (i1 == i2).float().mean() > 0.99
        torch.testing.assert_close(ap1, ap2, rtol=0, atol=1e-3)


AVX2_PLACES = """
import sys, torch, sdml_ext
from sdml_ext.ops import cosine_topk
assert sdml_ext.build_info()["cpu_gemm"]["gemm"] == "avx2"
gen = torch.Generator().manual_seed(5)
for nq, ng, d, k in ((305, 3001, 37, 9), (40, 1030, 520, 1030), (7, 17, 1, 4)):
    q, g = torch.randn(nq, d, generator=gen), torch.randn(ng, d, generator=gen)
    g[ng // 2] = g[0]  # a duplicate row
    many = cosine_topk(q, g, k)
    for i in (0, 1, nq // 2, nq - 1):  # one query: other tiles, the gallery split in ranges, packed per call
        one = cosine_topk(q[i:i + 1], g, k)
        assert torch.equal(one.scores[0], many.scores[i]) and torch.equal(one.indices[0], many.indices[i]), (nq, i)
    for threads in (1, 3):
        torch.set_num_threads(threads)
        again = cosine_topk(q, g, k)
        assert torch.equal(again.scores, many.scores) and torch.equal(again.indices, many.indices), threads
    torch.set_num_threads(2)
    ref = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T
    torch.testing.assert_close(many.scores.double(), ref.gather(1, many.indices), rtol=0, atol=(d + 2) * 2.0**-23)
print("ok")
"""


@pytest.mark.skipif(" avx2" not in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else True,
                    reason="this CPU has no AVX2: SDML_CPU_GEMM=avx2 falls back to BLAS (test_cpu_gemm_choice.py)")
def test_avx2_kernel_scores_a_pair_the_same_wherever_it_lies():
    """Our AVX2 kernel rounds each score as one chain of FMAs: a query's top-k is bitwise the
    same alone (its gallery split into ranges, blocks packed per call) or among 305 queries (the
    gallery packed once), on 1-3 threads, including partial panels and a d of 1; and within
    float32 rounding of float64."""
    import subprocess
    import sys

    env = dict(os.environ, SDML_CPU_GEMM="avx2", SDML_CACHE_DIR="off")
    proc = subprocess.run([sys.executable, "-P", "-c", AVX2_PLACES], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_inputs_need_not_be_normalized_or_contiguous(device):
    q, g, _, _ = class_structured(20, 70, 12, "class_ids", seed=2, device=device)
    plain = cosine_topk(q, g, 9)
    wide = torch.randn(70, 24, dtype=torch.float64, device=device)
    wide[:, ::2] = g * 7.0
    scaled = cosine_topk(q.t().contiguous().t() * 0.01, wide[:, ::2], 9)
    assert torch.equal(plain.indices, scaled.indices)
    assert torch.allclose(plain.scores, scaled.scores, rtol=0, atol=1e-14)


# ---- ranking metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_average_precision_matches_reference(size, kind, device):
    nq, ng, d = size
    q, g, ql, gl = class_structured(nq, ng, d, kind, seed=3 * nq + ng + d, device=device)
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    for k in (None, 1, 3, 50):
        for divisor in ("retrieved", "relevant"):
            for empty in ("zero", "skip"):
                ours = average_precision(q, g, ql, gl, k, divisor=divisor, empty=empty)
                assert ours.dtype == torch.float64
                assert_close(ours, ref.average_precision(scores, rel, k, divisor, empty))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_metrics_exact_under_ties(exclude_self, dtype, device):
    q, g, ql, gl = tied(300, 300, seed=5, dtype=dtype, device=device)
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    for k in (None, 10):
        ours = average_precision(q, g, ql, gl, k, exclude_self=exclude_self)
        assert_close(ours, ref.average_precision(scores, rel, k, exclude_self=exclude_self))
    ks = [1, 10, 299, 300, 1000]
    assert_close(precision_at_k(q, g, ql, gl, ks, exclude_self=exclude_self),
                 ref.precision_at_k(scores, rel, ks, exclude_self=exclude_self))
    assert_close(precision_recall_curve(q, g, ql, gl, LEVELS, exclude_self=exclude_self),
                 ref.precision_recall(scores, rel, LEVELS, exclude_self=exclude_self))


@pytest.mark.parametrize("device", DEVICES)
def test_d1_scores_are_all_ties(device):
    # With d = 1 every cosine is +1 or -1.
    q, g, ql, gl = class_structured(9, 40, 1, "multi_hot", seed=6, dtype=torch.float32, device=device)
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    assert set(np.unique(scores)) <= {-1.0, 1.0}
    assert_close(average_precision(q, g, ql, gl), ref.average_precision(scores, rel))
    assert np.array_equal(cosine_topk(q, g, 40).indices.cpu().numpy(), ref.topk(scores, 40)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("empty", ["zero", "skip"])
def test_curves_match_reference(empty, size, kind, device):
    nq, ng, d = size
    q, g, ql, gl = class_structured(nq, ng, d, kind, seed=nq + 2 * ng + d, device=device)
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    ks = [1, 2, 5, 100, 1000]
    assert_close(precision_at_k(q, g, ql, gl, ks, empty=empty), ref.precision_at_k(scores, rel, ks, empty))
    assert_close(precision_recall_curve(q, g, ql, gl, LEVELS, empty=empty),
                 ref.precision_recall(scores, rel, LEVELS, empty))


@pytest.mark.parametrize("kind", ["class_ids", "multi_hot_wide"])
@pytest.mark.parametrize("k", [0, 50])
def test_authors_rules_reproduced(k, kind):
    """Our op under the authors' options agrees with a reproduction of their code to 1e-6."""
    q, g, ql, gl = class_structured(150, 400, 24, kind, seed=7)
    empty = "zero" if kind == "class_ids" else "skip"
    ap = average_precision(q, g, ql, gl, k or None, divisor="retrieved", empty=empty)
    assert abs(float(torch.nanmean(ap)) - ref.authors_map(q, g, ql, gl, k)) <= 1e-6


def test_label_dtypes_are_interchangeable():
    q, g, ql, gl = class_structured(30, 60, 8, "multi_hot", seed=8)
    base = average_precision(q, g, ql, gl)
    for dtype in (torch.bool, torch.uint8, torch.int32, torch.float32):
        assert torch.equal(average_precision(q, g, ql.to(dtype), gl.to(dtype)), base)
    q, g, ql, gl = class_structured(30, 60, 8, "class_ids", seed=8)
    assert torch.equal(average_precision(q, g, ql.int(), gl.short()), average_precision(q, g, ql, gl))


def test_no_queries():
    q, g, ql, gl = class_structured(0, 10, 4, "class_ids", seed=9)
    assert average_precision(q, g, ql, gl).shape == (0,)
    assert cosine_topk(q, g, 3).indices.shape == (0, 3)
    assert precision_at_k(q, g, ql, gl, [1, 2]).shape == (0, 2)


def test_thread_count_independent():
    q, g, ql, gl = class_structured(600, 900, 16, "multi_hot", seed=10, dtype=torch.float32)
    first = (average_precision(q, g, ql, gl), cosine_topk(q, g, 20))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = (average_precision(q, g, ql, gl), cosine_topk(q, g, 20))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1].indices, second[1].indices) and torch.equal(first[1].scores, second[1].scores)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_opcheck(dtype, device):
    q, g, ql, gl = class_structured(11, 23, 5, "multi_hot", seed=11, dtype=dtype, device=device)
    ids = torch.arange(11, device=device) % 3
    torch.library.opcheck(torch.ops.sdml.cosine_topk.default, (q, g, 4, False))
    torch.library.opcheck(torch.ops.sdml.cosine_topk.default, (q, q, 4, True))
    # (opcheck compares outputs without equal_nan, so "skip" is checked where no query is empty)
    torch.library.opcheck(torch.ops.sdml.average_precision.default, (q, g, ql, gl, 5, "relevant", "zero", False))
    torch.library.opcheck(torch.ops.sdml.average_precision.default, (q, q, ids, ids, None, "retrieved", "skip", True))
    torch.library.opcheck(torch.ops.sdml.precision_at_k.default, (q, g, ql, gl, [1, 5], "zero", False))
    torch.library.opcheck(torch.ops.sdml.average_precision_pair.default, (q, g, ql, gl, None, "retrieved", "zero"))
    torch.library.opcheck(torch.ops.sdml.average_precision_pair.default, (q, g, ids, ids[:1].expand(23).contiguous(),
                                                                          4, "relevant", "zero"))
    torch.library.opcheck(torch.ops.sdml.precision_recall_curve.default, (q, g, ql, gl, [0.0, 0.5], "zero", False))


def test_precision_at_one_cutoff_is_one_column():
    q, g, ql, gl = class_structured(13, 40, 6, "class_ids", seed=16)
    several = precision_at_k(q, g, ql, gl, [5, 10])
    one = precision_at_k(q, g, ql, gl, 10)
    assert one.shape == (13,) and torch.equal(one, several[:, 1])


# ---- identical gallery rows tie wherever they sit ---------------------------------------------


def repeated_rows(nq, ng, dtype, seed, distinct=7, d=24):
    """A gallery of `distinct` random rows, each repeated at random positions (so every group
    straddles the 1024-column blocks and the query tiles), and random queries."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct, d, generator=gen, dtype=torch.float64)
    which = torch.randint(0, distinct, (ng,), generator=gen)
    which[:distinct] = torch.arange(distinct)
    g = base[which]
    q = torch.randn(nq, d, generator=gen, dtype=torch.float64)
    ql = torch.randint(-1, 3, (nq,), generator=gen)
    gl = torch.randint(-1, 3, (ng,), generator=gen)  # duplicates with different labels
    return q.to(dtype), g.to(dtype), ql, gl, which


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("nq, ng", [(1, 1025), (17, 2049), (300, 3100)])
def test_identical_rows_score_alike_across_blocks(nq, ng, dtype):
    q, g, ql, gl, which = repeated_rows(nq, ng, dtype, seed=nq + ng)
    top = cosine_topk(q, g, ng)
    for i in range(nq):
        idx, sc = top.indices[i], top.scores[i]
        group = which[idx]
        # Each group of identical rows: one score, consecutive places, ascending indices.
        for c in group.unique():
            at = (group == c).nonzero().view(-1)
            assert torch.equal(at, torch.arange(int(at[0]), int(at[0]) + at.numel()))
            assert (sc[at] == sc[at[0]]).all() and (idx[at].diff() > 0).all()
    # The ranking metrics see the same ties: exact against the float64 reference (the distinct
    # rows' scores are far apart, so rounding cannot reorder them).
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    assert_close(average_precision(q, g, ql, gl), ref.average_precision(scores, rel))
    assert_close(precision_at_k(q, g, ql, gl, [1, 500, 1500]), ref.precision_at_k(scores, rel, [1, 500, 1500]))
    a_to_b, b_to_a = average_precision_pair(q, g, ql, gl)
    assert_close(a_to_b, ref.average_precision(scores, rel))
    assert_close(b_to_a, ref.average_precision(scores.T, rel.T))


def test_duplicate_rows_with_exclude_self():
    q, g, ql, gl, which = repeated_rows(1, 1500, torch.float32, seed=3)
    scores, rel = ref.cosine_scores(g, g), ref.relevance(gl, gl)
    top = cosine_topk(g, g, 1499, exclude_self=True)
    assert np.array_equal(top.indices.numpy(), ref.topk(scores, 1499, exclude_self=True)[1])
    assert_close(average_precision(g, g, gl, gl, exclude_self=True), ref.average_precision(scores, rel, exclude_self=True))


# ---- few queries: the gallery split across threads ---------------------------------------------
# Fewer query tiles (16 rows) than threads: each tile's gallery is split into ranges of whole
# 1024-column blocks scored on different threads, and their top-k merged. Forcing 1 and 7
# threads covers no split, and splits into several ranges (7 threads need not be cores).


def with_threads(n, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("nq, ng, k", [(1, 5000, 10), (3, 4097, 1), (8, 9000, 700), (40, 3100, 50)])
def test_topk_split_gallery_matches_one_thread(nq, ng, k, dtype):
    q, g, _, _ = class_structured(nq, ng, 16, "class_ids", seed=nq + ng, dtype=dtype)
    one = with_threads(1, lambda: cosine_topk(q, g, k))
    many = with_threads(7, lambda: cosine_topk(q, g, k))
    assert torch.equal(one.indices, many.indices) and torch.equal(one.scores, many.scores)
    want_scores, want_idx = ref.topk(ref.cosine_scores(q, g), k)
    if dtype == torch.float64:
        assert np.array_equal(many.indices.numpy(), want_idx)
    assert_close(many.scores.double(), want_scores, atol=1e-12 if dtype == torch.float64 else 1e-5)


def assert_split_matches(q, g, k, exclude_self=False, threads=7):
    """One thread (no split) and `threads` (split) agree bitwise, and with the reference ranking."""
    many = with_threads(threads, lambda: cosine_topk(q, g, k, exclude_self=exclude_self))
    one = with_threads(1, lambda: cosine_topk(q, g, k, exclude_self=exclude_self))
    assert torch.equal(one.indices, many.indices) and torch.equal(one.scores, many.scores)
    assert np.array_equal(many.indices.numpy(), ref.topk(ref.cosine_scores(q, g), k, exclude_self)[1])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_topk_split_gallery_duplicates_and_ties(dtype):
    """Duplicates whose first row lies in another range, and exact ties across ranges."""
    q, g, _, _, _ = repeated_rows(5, 4100, dtype, seed=21)
    assert_split_matches(q, g, 4100)
    assert_split_matches(q, g, 3)
    tq, tg, _, _ = tied(5, 3000, seed=22, dtype=dtype, device="cpu")
    for k in (1, 40, 3000):
        assert_split_matches(tq, tg, k)


def test_topk_split_gallery_exclude_self():
    """exclude_self needs Nq == Ng, so a split (fewer 16-row tiles than threads, a gallery of
    two blocks) needs more threads than 1100 / 16: the query itself sits in either range."""
    _, g, _, _, _ = repeated_rows(1, 1100, torch.float32, seed=23)
    assert_split_matches(g, g, 1099, exclude_self=True, threads=80)
    assert_split_matches(g, g, 7, exclude_self=True, threads=80)


# ---- both directions of a pair from one GEMM ---------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("size", [(1, 1, 3), (1, 7, 3), (5, 1, 4), (300, 50, 8), (40, 2100, 16)])
def test_average_precision_pair_matches_both_directions(size, kind, dtype):
    na, nb, d = size
    a, b, al, bl = class_structured(na, nb, d, kind, seed=na + 5 * nb + d, dtype=dtype)
    scores, rel = ref.cosine_scores(a, b), ref.relevance(al, bl)
    for k in (None, 3):
        for divisor, empty in (("retrieved", "zero"), ("relevant", "skip")):
            a_to_b, b_to_a = average_precision_pair(a, b, al, bl, k, divisor=divisor, empty=empty)
            assert a_to_b.dtype == b_to_a.dtype == torch.float64
            if dtype == torch.float64:
                assert_close(a_to_b, ref.average_precision(scores, rel, k, divisor, empty))
                assert_close(b_to_a, ref.average_precision(scores.T, rel.T, k, divisor, empty))
            # The pair is the two one-direction ops: a->b runs the same GEMM tiles (bitwise equal);
            # b->a ranks the transpose of a's tiles, equal here (no near-tie within rounding).
            assert torch.equal(a_to_b.nan_to_num(-1), average_precision(a, b, al, bl, k, divisor=divisor,
                                                                        empty=empty).nan_to_num(-1))
            assert torch.equal(b_to_a.nan_to_num(-1), average_precision(b, a, bl, al, k, divisor=divisor,
                                                                        empty=empty).nan_to_num(-1))


def test_average_precision_pair_bad_input():
    args = _good()
    with pytest.raises(ValueError, match="average_precision_pair: a has no rows"):
        average_precision_pair(args["query"][:0], args["gallery"], args["query_labels"][:0], args["gallery_labels"])
    with pytest.raises(ValueError, match="average_precision_pair: k must be positive"):
        average_precision_pair(*args.values(), k=0)
    with pytest.raises(ValueError, match="gallery_labels must have one entry per gallery row"):
        average_precision_pair(args["query"], args["gallery"], args["query_labels"], args["gallery_labels"][:2])


# ---- not differentiable; meta and fake tensors ---------------------------------------------------


def test_inputs_requiring_grad_are_read_as_values():
    q, g, ql, gl = class_structured(9, 30, 5, "class_ids", seed=17)
    plain = [*cosine_topk(q, g, 4), average_precision(q, g, ql, gl), precision_at_k(q, g, ql, gl, [3]),
             precision_recall_curve(q, g, ql, gl), *average_precision_pair(q, g, ql, gl)]
    qg, gg = q.clone().requires_grad_(), g.clone().requires_grad_()
    graded = [*cosine_topk(qg, gg, 4), average_precision(qg, gg, ql, gl), precision_at_k(qg, gg, ql, gl, [3]),
              precision_recall_curve(qg, gg, ql, gl), *average_precision_pair(qg, gg, ql, gl)]
    for a, b in zip(plain, graded):
        assert not b.requires_grad and torch.equal(a, b)


def test_meta_tensor_mixed_with_cpu_is_rejected():
    args = _good()
    for name in args:
        bad = dict(args, **{name: args[name].to("meta")})
        with pytest.raises(ValueError, match=f"{name} is on meta but query is on cpu|gallery is on cpu but query is on meta"):
            average_precision(**bad)
    with pytest.raises(ValueError, match="gallery is on meta but query is on cpu"):
        cosine_topk(args["query"], args["gallery"].to("meta"), 2)


def _fake_call(fn):
    with FakeTensorMode():
        return fn()


BAD_SHAPES = [
    (lambda: cosine_topk(torch.empty(4, 3), torch.empty(6, 5), 2), "same embedding size d"),
    (lambda: cosine_topk(torch.empty(4, 3), torch.empty(6, 3), 7), r"k = 7 must lie in \[1, 6\]"),
    (lambda: cosine_topk(torch.empty(6, 3), torch.empty(6, 3), 6, exclude_self=True), r"k = 6 must lie in \[1, 5\]"),
    (lambda: cosine_topk(torch.empty(4), torch.empty(6, 3), 2), "query must be a 2-D tensor"),
    (lambda: average_precision(torch.empty(4, 3), torch.empty(6, 3), torch.zeros(5, dtype=torch.long),
                               torch.zeros(6, dtype=torch.long)), "query_labels must have one entry per query row"),
    (lambda: average_precision(torch.empty(4, 3), torch.empty(5, 3), torch.zeros(4, dtype=torch.long),
                               torch.zeros(5, dtype=torch.long), exclude_self=True), "exclude_self needs"),
    (lambda: precision_at_k(torch.empty(4, 3), torch.empty(6, 3), torch.zeros(4, 2), torch.zeros(6, 3), [1]),
     "same positive number of classes"),
    (lambda: precision_at_k(torch.empty(4, 3), torch.empty(6, 3), torch.zeros(4, dtype=torch.long),
                            torch.zeros(6, dtype=torch.long), [0]), "k must list positive cut-offs"),
    (lambda: precision_recall_curve(torch.empty(4, 3), torch.empty(6, 3), torch.zeros(4, dtype=torch.long),
                                    torch.zeros(6, dtype=torch.long), [2.0]), r"recall_levels must list levels in \[0, 1\]"),
    (lambda: average_precision_pair(torch.empty(4, 3), torch.empty(6, 3, dtype=torch.float64),
                                    torch.zeros(4, dtype=torch.long), torch.zeros(6, dtype=torch.long)), "gallery has dtype"),
]


@pytest.mark.parametrize("call, match", BAD_SHAPES)
def test_fake_implementations_check_shapes(call, match):
    """Under FakeTensorMode (what torch.compile traces with) the fake implementations run, not the
    kernels: bad shapes must fail there too, with the kernels' messages."""
    with pytest.raises((ValueError, TypeError), match=match):
        _fake_call(call)


def test_fake_implementations_give_the_output_shapes():
    q, g, ql, gl = class_structured(5, 9, 4, "multi_hot", seed=18)
    with FakeTensorMode(allow_non_fake_inputs=True):
        top = cosine_topk(q, g, 3)
        pair = average_precision_pair(q, g, ql, gl)
        pk = precision_at_k(q, g, ql, gl, [1, 2])
    assert top.scores.shape == (5, 3) and top.indices.dtype == torch.int64
    assert pair[0].shape == (5,) and pair[1].shape == (9,) and pk.shape == (5, 2)


def test_compiled_call_matches_eager():
    q, g, ql, gl = class_structured(8, 20, 4, "class_ids", seed=19, dtype=torch.float32)
    compiled = torch.compile(lambda a, b: average_precision(a, b, ql, gl, 5), fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, g), average_precision(q, g, ql, gl, 5))


# ---- CUDA against the CPU kernel ------------------------------------------------------------------

def _all_ops(q, g, ql, gl, exclude_self=False):
    return [
        *cosine_topk(q, g, 7, exclude_self=exclude_self),
        average_precision(q, g, ql, gl, exclude_self=exclude_self),
        average_precision(q, g, ql, gl, 20, divisor="relevant", empty="skip", exclude_self=exclude_self),
        *average_precision_pair(q, g, ql, gl, 20),
        precision_at_k(q, g, ql, gl, [1, 10, 100, 10**6], empty="skip", exclude_self=exclude_self),
        precision_recall_curve(q, g, ql, gl, LEVELS, exclude_self=exclude_self),
    ]


@requires_cuda
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_cuda_matches_cpu_kernel_on_current_stream(exclude_self, kind):
    q, g, ql, gl = class_structured(300, 300, 16, kind, seed=13)
    cpu = _all_ops(q, g, ql, gl, exclude_self)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = _all_ops(q.cuda(), g.cuda(), ql.cuda(), gl.cuda(), exclude_self)
    stream.synchronize()
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-12, equal_nan=True)


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["class_ids", "multi_hot_wide"])
def test_cuda_several_tiles_match_cpu(kind):
    """1500 x 50000 exceeds one CUDA tile (2^26 scores): 1342 + 158 query rows."""
    q, g, ql, gl = class_structured(1500, 50000, 16, kind, seed=14)
    cpu = [average_precision(q, g, ql, gl), cosine_topk(q, g, 30).indices]
    gpu = [average_precision(q.cuda(), g.cuda(), ql.cuda(), gl.cuda()), cosine_topk(q.cuda(), g.cuda(), 30).indices]
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=1e-12)
    assert torch.equal(gpu[1].cpu(), cpu[1])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_close_to_float64(dtype):
    q, g, ql, gl = class_structured(200, 500, 32, "class_ids", seed=15)
    exact = float(average_precision(q, g, ql, gl).mean())
    low = average_precision(q.cuda().to(dtype), g.cuda().to(dtype), ql.cuda(), gl.cuda())
    assert abs(float(low.mean()) - exact) < 0.02
    top = cosine_topk(q.cuda().to(dtype), g.cuda().to(dtype), 10)
    assert top.scores.dtype == dtype
    want = torch.from_numpy(ref.topk(ref.cosine_scores(q, g), 10)[0])
    torch.testing.assert_close(top.scores.double().cpu(), want, rtol=0, atol=0.02)


# ---- bad input -----------------------------------------------------------------------------------


def _good():
    q, g, ql, gl = class_structured(4, 6, 3, "class_ids", seed=12, dtype=torch.float32)
    return dict(query=q, gallery=g, query_labels=ql, gallery_labels=gl)


def _with(**changes):
    args = _good()
    args.update(changes)
    return args


def _nonfinite(name, value):
    args = _good()
    args[name] = args[name].clone()
    args[name][1, 2] = value
    return args


def _zero_row(name):
    args = _good()
    args[name] = args[name].clone()
    args[name][2] = 0
    return args


BAD = [
    (_with(gallery=torch.ones(6, 4)), ValueError, "query and gallery must have the same embedding size d"),
    (_with(query=torch.ones(4)), ValueError, "query must be a 2-D"),
    (_with(gallery=torch.ones(0, 3)), ValueError, "gallery has no rows"),
    (_with(query=torch.ones(4, 0), gallery=torch.ones(6, 0)), ValueError, "query has no columns"),
    (_with(query=torch.ones(4, 3, dtype=torch.int32)), TypeError, "query must be a floating-point"),
    (_with(gallery=torch.ones(6, 3, dtype=torch.float64)), TypeError, "gallery has dtype Double but query"),
    (_with(query=torch.ones(4, 3, dtype=torch.float16), gallery=torch.ones(6, 3, dtype=torch.float16)), TypeError,
     "on CPU query must be float32 or float64"),
    (_nonfinite("query", float("nan")), ValueError, r"query contains NaN or Inf \(row 1"),
    (_nonfinite("gallery", float("inf")), ValueError, r"gallery contains NaN or Inf \(row 1"),
    (_zero_row("query"), ValueError, "query row 2 has zero norm"),
    (_zero_row("gallery"), ValueError, "gallery row 2 has zero norm"),
    (_with(query_labels=torch.zeros(5, dtype=torch.long)), ValueError, "query_labels must have one entry per query row"),
    (_with(gallery_labels=torch.zeros(4, dtype=torch.long)), ValueError, "gallery_labels must have one entry per gallery"),
    (_with(query_labels=torch.zeros(4, 2)), ValueError, "query_labels and gallery_labels must both be class ids"),
    (_with(query_labels=torch.zeros(4, 2), gallery_labels=torch.zeros(6, 3)), ValueError, "gallery_labels must have the same positive number of classes"),
    (_with(query_labels=torch.zeros(4)), TypeError, "query_labels as a 1-D tensor holds class ids"),
    (_with(gallery_labels=torch.full((6,), -2)), ValueError, "gallery_labels class ids must be >= -1"),
    (_with(query_labels=torch.full((4, 2), float("nan")), gallery_labels=torch.zeros(6, 2)), ValueError,
     "query_labels contains NaN"),
]


@pytest.mark.parametrize("args, error, match", BAD)
def test_bad_input_names_the_argument(args, error, match):
    for op in (average_precision, precision_at_k, precision_recall_curve):
        with pytest.raises(error, match=match):
            op(**args)
    if "labels" not in match:
        with pytest.raises(error, match=match):
            cosine_topk(args["query"], args["gallery"], 2)


def test_bad_options():
    args = _good()
    with pytest.raises(ValueError, match="average_precision: k must be positive"):
        average_precision(**args, k=0)
    with pytest.raises(ValueError, match="k must be positive"):
        average_precision(**args, k=-3)
    with pytest.raises(ValueError, match="divisor must be"):
        average_precision(**args, divisor="all")
    with pytest.raises(ValueError, match="empty must be"):
        average_precision(**args, empty="nan")
    with pytest.raises(ValueError, match="every cut-off in k must be positive"):
        precision_at_k(**args, k=[10, 0])
    with pytest.raises(ValueError, match="k must list"):
        precision_at_k(**args, k=[])
    with pytest.raises(ValueError, match=r"recall_levels must lie in \[0, 1\]"):
        precision_recall_curve(**args, recall_levels=[0.5, 1.5])
    with pytest.raises(ValueError, match="exclude_self needs the query and gallery to be the same samples"):
        average_precision(**args, exclude_self=True)
    with pytest.raises(ValueError, match="cosine_topk: k must be positive"):
        cosine_topk(args["query"], args["gallery"], 0)
    with pytest.raises(ValueError, match="k = 7 exceeds the 6 gallery items"):
        cosine_topk(args["query"], args["gallery"], 7)
    with pytest.raises(ValueError, match="k = 4 exceeds the 3 gallery items.*exclude_self"):
        cosine_topk(args["query"], args["query"], 4, exclude_self=True)


@requires_cuda
def test_mixed_devices():
    args = _good()
    with pytest.raises(ValueError, match="gallery is on cuda:0 but query is on cpu"):
        cosine_topk(args["query"], args["gallery"].cuda(), 2)
    with pytest.raises(ValueError, match="gallery_labels is on cuda:0 but query is on cpu"):
        average_precision(**_with(gallery_labels=args["gallery_labels"].cuda()))


# ---- the CUDA top-k that selects and the AP that ranks only relevant items ---------------------
# Host pieces (precision argument, margins, launch plans) run here; the kernels on a GPU host.

from sdml_ext import _extension  # noqa: E402

U32, U64 = 2.0**-24, 2.0**-53
H200 = dict(sm_count=132, smem_optin=232448)  # its multiprocessors and per-block opt-in shared memory


def test_topk_precision_argument():
    q, g = torch.randn(5, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    assert torch.equal(cosine_topk(q, g, 3, precision="exact").indices, cosine_topk(q, g, 3).indices)
    with pytest.raises(ValueError, match='precision must be "exact", "tf32" or "bf16", got "fp8"'):
        cosine_topk(q, g, 3, precision="fp8")
    with FakeTensorMode():
        fq, fg = torch.empty(5, 8, device="cuda"), torch.empty(9, 8, device="cuda")
        assert cosine_topk(fq, fg, 3, precision="bf16").indices.shape == (5, 3)
        with pytest.raises(ValueError, match="precision must be"):
            cosine_topk(fq, fg, 3, precision="fp8")


def _gamma(n, u):
    return n * u / (1 - n * u)


@pytest.mark.parametrize("d", [1, 3, 512, 4096])
def test_topk_margin_formula(d):
    m = _extension._C.topk_margin
    nu = U32 + _gamma(d + 2, U32)
    norms = (1 + nu) ** 2
    exact = m("exact", "float32", d)
    assert exact["delta_low"] == pytest.approx(_gamma(d + 1, U32) * norms, rel=1e-12)
    assert exact["delta_det"] == pytest.approx(_gamma(d + 1, U64) * norms, rel=1e-12)
    assert exact["margin"] == pytest.approx(2 * (exact["delta_low"] + exact["delta_det"]) * 1.001 + 4 * U32, rel=1e-12)
    ub = 2.0**-8
    bf = m("bf16", "float32", d)
    assert bf["delta_low"] == pytest.approx((2 * ub + ub * ub + _gamma(d + 1, 2 * U32) * (1 + ub) ** 2) * norms, rel=1e-12)
    assert exact["margin"] < m("tf32", "float32", d)["margin"] < bf["margin"]
    assert m("exact", "float64", d)["margin"] < 1e-9  # a float64 GEMM: candidates within ~d ulps
    with pytest.raises(ValueError, match='precision must be "exact", "tf32" or "bf16"'):
        m("fp16", "float32", d)


def _near_tie_data(nq, ng, d, gap, seed):
    """Unit queries; each has a block of gallery items whose cosines to it step down by `gap`
    (far below bfloat16's resolution at 1, ~4e-3, far above float32 rounding), among noise."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=gen, dtype=torch.float64), dim=1)
    g = torch.randn(ng, d, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.normalize(g, dim=1)
    per = ng // (2 * nq)
    for i in range(nq):
        other = torch.randn(d, generator=gen, dtype=torch.float64)
        other = torch.nn.functional.normalize(other - (other @ q[i]) * q[i], dim=0)  # orthogonal to q[i]
        cos = 0.9 - gap * torch.arange(per, dtype=torch.float64)
        rows = cos[:, None] * q[i] + torch.sqrt(1 - cos**2)[:, None] * other
        slots = torch.randperm(ng, generator=gen)[:per]
        g[slots] = rows
    return q, g


def test_margin_keeps_every_true_top_k_item_under_bfloat16_rounding():
    """The rule of the fast mode, emulated on CPU: bfloat16-rounded rows, products summed in
    float32, candidates = low score >= k-th low score - margin. Every item of the float64 top-k
    must be a candidate, on data whose near-ties bfloat16 cannot resolve."""
    q, g = _near_tie_data(6, 3000, 64, gap=2e-4, seed=3)
    d, k = q.shape[1], 20
    margin = _extension._C.topk_margin("bf16", "float64", d)["margin"]
    low = (q.bfloat16().float() @ g.bfloat16().float().T).double()
    exact = q @ g.T
    assert (low - exact).abs().max() <= _extension._C.topk_margin("bf16", "float64", d)["delta_low"]
    kth = low.topk(k, dim=1).values[:, -1:]
    candidates = low >= kth - margin
    truth = exact.topk(k, dim=1).indices
    assert bool(candidates.gather(1, truth).all())
    assert int(candidates.sum(1).max()) < 40 * k  # and the margin stays a small multiple of k
    # The low scores alone would misorder the top k: the near-ties are real.
    assert not torch.equal(low.topk(k, dim=1).indices, truth)


@pytest.mark.parametrize(
    "nq, ng, k, score_bytes",
    [(10_000, 1_000_000, 10, 4), (10_000, 1_000_000, 1000, 4), (1, 1_000_000, 50, 4), (10_000, 100_000, 2048, 4),
     (3, 7, 7, 8), (2**20, 2**30, 5, 4), (1, 1, 1, 4)],
)
def test_topk_plan_invariants(nq, ng, k, score_bytes):
    W = 2**28
    p = _extension._C.topk_plan(nq, ng, k, score_bytes, W, **H200)
    assert not p["fallback"]
    assert p["tile_rows"] >= 1 and p["tile_rows"] * p["ld"] <= max(W, p["sweep"])  # memory bounded by the tile
    assert p["ld"] % (16 // score_bytes) == 0 and p["ld"] >= p["block_cols"]  # 16-byte aligned rows
    assert p["sweep"] == 256 * (16 // score_bytes)
    assert p["buffer"] & (p["buffer"] - 1) == 0 and p["cap"] == p["buffer"] - p["sweep"] and p["cap"] >= 2 * k
    assert p["segment_cols"] % p["sweep"] == 0  # segments start 16-byte aligned
    assert p["segments"] * p["segment_cols"] >= p["block_cols"] > (p["segments"] - 1) * p["segment_cols"]
    assert p["select_smem"] == p["buffer"] * (score_bytes + 4)
    assert p["merge_smem"] == p["buffer"] * (score_bytes + 12) <= H200["smem_optin"] - 1024
    assert p["fallback_rows"] >= 1


@pytest.mark.parametrize("k", [1, 10, 1000, 2048])
@pytest.mark.parametrize("score_bytes", [4, 8])
def test_topk_plan_of_the_fast_modes_keeps_more_candidates(k, score_bytes):
    exact = _extension._C.topk_plan(100, 10**6, k, score_bytes, 2**28, **H200)
    fast = _extension._C.topk_plan(100, 10**6, k, score_bytes, 2**28, **H200, fast=True)
    assert not fast["fallback"] and fast["buffer"] <= 8192 and fast["cap"] >= exact["cap"]
    assert fast["cap"] >= min(4 * k, 8192 - fast["sweep"])
    assert fast["merge_smem"] <= H200["smem_optin"] - 1024


def test_topk_plan_shapes_of_the_benchmark():
    W = 2**28
    big = _extension._C.topk_plan(10_000, 1_000_000, 10, 4, W, **H200)
    assert big["block_cols"] == 1_000_000 and big["tile_rows"] == 268  # a 268 x 1M GEMM per tile
    one = _extension._C.topk_plan(1, 1_000_000, 10, 4, W, **H200)
    assert one["segments"] >= 100  # a single query still spreads over the multiprocessors
    huge = _extension._C.topk_plan(64, 2**31 - 2, 10, 4, W, **H200)
    assert huge["block_cols"] < 2**31 - 2  # gallery blocks, merged through the running list


def test_topk_plan_fallbacks_and_limits():
    W = 2**28
    assert _extension._C.topk_plan(10, 100_000, 2049, 4, W, **H200)["fallback"]  # k > 2048
    assert _extension._C.topk_plan(10, 100_000, 2048, 8, W, sm_count=132, smem_optin=49152)["fallback"]  # small GPU
    with pytest.raises(ValueError, match="fewer than 2\\^31 - 1 rows"):
        _extension._C.topk_plan(1, 2**31, 5, 4, W, **H200)
    assert _extension._C.topk_default_workspace(2**40, 4) == 2**28
    assert _extension._C.topk_default_workspace(2**30, 4) == 2**26
    assert _extension._C.topk_default_workspace(0, 4) == 2**16


def test_ap_rank_plan():
    plan = _extension._C.ap_rank_plan
    assert plan(2400, 4, H200["smem_optin"])["capacity"] == 4096
    assert plan(2400, 4, H200["smem_optin"])["smem"] == 4096 * 12 + 4
    assert plan(10**6, 4, H200["smem_optin"])["capacity"] == 16384  # the largest that fits: rows above sort
    assert plan(10**6, 8, H200["smem_optin"])["capacity"] == 8192
    assert plan(1, 8, 1000)["capacity"] == 0


# -- on a GPU host --


def _reference_topk(q, g, k, exclude_self=False):
    """The CUDA op's contract: rows normalized on the device in the input dtype (as the op does),
    ranked by their float64 dot products, ties by ascending index."""
    qc, gc = q.cuda(), g.cuda()
    qn = (qc / torch.linalg.vector_norm(qc, dim=1, keepdim=True)).double().cpu().numpy()
    gn = (gc / torch.linalg.vector_norm(gc, dim=1, keepdim=True)).double().cpu().numpy()
    scores = np.stack([(gn * row).sum(axis=1) for row in qn])
    return ref.topk(scores, k, exclude_self)


def _cuda_topk_vs_reference(q, g, k, exclude_self=False, precisions=("exact", "tf32", "bf16")):
    want_scores, want_idx = _reference_topk(q, g, k, exclude_self)
    cpu = cosine_topk(q.cpu(), g.cpu(), k, exclude_self=exclude_self) if q.dtype == torch.float64 else None
    for precision in precisions:
        got = cosine_topk(q.cuda(), g.cuda(), k, exclude_self=exclude_self, precision=precision)
        assert got.indices.dtype == torch.int64 and got.scores.dtype == q.dtype
        assert np.array_equal(got.indices.cpu().numpy(), want_idx), precision
        if cpu is not None:
            assert torch.equal(got.indices.cpu(), cpu.indices), precision
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(q.dtype, 1e-2)
        np.testing.assert_allclose(got.scores.double().cpu().numpy(), want_scores, rtol=0, atol=tol)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("nq, ng, d, k", [(1, 7, 3, 1), (1, 7, 3, 7), (13, 33, 5, 5), (64, 1000, 10, 10),
                                          (257, 3001, 17, 50), (3, 20_000, 8, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_cuda_topk_matches_cpu_and_float64(nq, ng, d, k, dtype, exclude_self):
    if exclude_self:
        nq = ng = min(ng, 3001)
        k = min(k, ng - 1)
    gen = torch.Generator().manual_seed(nq + ng + k)
    q = torch.randn(nq, d, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(ng, d, generator=gen, dtype=torch.float64).to(dtype)
    _cuda_topk_vs_reference(q, g, k, exclude_self)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_topk_half_inputs_rank_their_normalized_rows(dtype):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(40, 24, generator=gen).to(dtype).cuda()
    g = torch.randn(3000, 24, generator=gen).to(dtype).cuda()
    # The rows as the op normalizes them (in the input dtype), ranked in float64.
    qn = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    gn = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    _, want = ref.topk((qn.double() @ gn.double().T).cpu().numpy(), 25)
    for precision in ("exact", "tf32", "bf16"):
        got = cosine_topk(q, g, 25, precision=precision)
        assert got.scores.dtype == dtype and np.array_equal(got.indices.cpu().numpy(), want), precision


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("k", [1, 9, 30])
def test_cuda_fast_modes_return_the_exact_ids_on_near_ties(k):
    q, g = _near_tie_data(8, 6000, 64, gap=2e-4, seed=11)
    _cuda_topk_vs_reference(q.float(), g.float(), k)
    _cuda_topk_vs_reference(q, g, k)


@pytest.mark.cuda
@requires_cuda
def test_cuda_topk_duplicates_and_massive_ties():
    """Exact duplicate rows tie in ascending index order; 3000 identical rows all within the
    margin overflow the candidate buffers and take the fallback, with the same contract."""
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(5000, 16, generator=gen, dtype=torch.float64)
    g[[4000, 17, 2500, 3]] = g[1234]  # duplicates before and after their first row
    g[100:3100] = g[99]  # a block of 3000 identical rows
    q = torch.cat([g[[1234, 99]] + 1e-3 * torch.randn(2, 16, generator=gen, dtype=torch.float64),
                   torch.randn(5, 16, generator=gen, dtype=torch.float64)])
    for dtype in (torch.float64, torch.float32):
        _cuda_topk_vs_reference(q.to(dtype), g.to(dtype), 10)
        got = cosine_topk(q.to(dtype).cuda(), g.to(dtype).cuda(), 10)
        assert got.indices[0, :5].tolist() == [3, 17, 1234, 2500, 4000]
        assert len(set(got.scores[0, :5].tolist())) == 1  # identical rows, identical scores
        assert got.indices[1].tolist() == list(range(99, 109))


@pytest.mark.cuda
@requires_cuda
def test_cuda_topk_fallback_for_large_k_and_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(9, 40, generator=gen, dtype=torch.float64)[:, ::2]  # non-contiguous
    g = torch.randn(20, 9000, generator=gen, dtype=torch.float64).t()
    assert not q.is_contiguous() and not g.is_contiguous()
    _cuda_topk_vs_reference(q, g, 2500)  # k > 2048: torch.topk for the k-th, then the re-score
    _cuda_topk_vs_reference(q.float(), g.float(), 4000, precisions=("exact", "bf16"))


@pytest.mark.cuda
@requires_cuda
def test_cuda_topk_several_tiles_and_gallery_blocks(monkeypatch):
    """A small workspace forces several query tiles and gallery blocks (the running list)."""
    monkeypatch.setenv("SDML_CUDA_TOPK_WORKSPACE", str(3 * 4096))
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(70, 12, generator=gen)
    g = torch.randn(30_001, 12, generator=gen)
    for k in (1, 17, 300):
        _cuda_topk_vs_reference(q, g, k)
    _cuda_topk_vs_reference(q[:60], g[:60], 7, exclude_self=True)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("cap", [None, "4", "0"])
def test_cuda_average_precision_ranks_only_relevant_items(kind, cap, monkeypatch):
    """AP from the relevant items' ranks against the float64 reference (ties, duplicates, empty
    label rows, exclude_self, AP@k, both divisors); cap 4 sends most rows through the sort path,
    cap 0 all of them."""
    if cap:
        monkeypatch.setenv("SDML_CUDA_AP_MAX_CAPACITY", cap)
    q, g, ql, gl = class_structured(300, 700, 6, kind, seed=31)
    g[50:60] = g[7]  # duplicates tie
    g[200:205] = g[201]
    scores, rel = ref.cosine_scores(q, g), ref.relevance(ql, gl)
    for k, divisor, empty in [(None, "retrieved", "zero"), (25, "relevant", "skip"), (1, "retrieved", "skip")]:
        want = ref.average_precision(scores, rel, k, divisor, empty)
        got = average_precision(q.cuda(), g.cuda(), ql.cuda(), gl.cuda(), k, divisor=divisor, empty=empty)
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=1e-12, equal_nan=True)
    sq, sl = q[:300], ql[:300]
    want = ref.average_precision(ref.cosine_scores(sq, sq), ref.relevance(sl, sl), exclude_self=True)
    got = average_precision(sq.cuda(), sq.cuda(), sl.cuda(), sl.cuda(), exclude_self=True)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=1e-12)
    a_to_b, b_to_a = average_precision_pair(q.cuda(), g.cuda(), ql.cuda(), gl.cuda())
    np.testing.assert_allclose(a_to_b.cpu().numpy(), ref.average_precision(scores, rel), rtol=0, atol=1e-12)
    np.testing.assert_allclose(b_to_a.cpu().numpy(), ref.average_precision(scores.T, rel.T), rtol=0, atol=1e-12)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_average_precision_matches_cpu_kernel_in_one_row_and_odd_sizes(dtype):
    for nq, ng in [(1, 1), (1, 9), (7, 1), (33, 517)]:
        q, g, ql, gl = class_structured(nq, ng, 5, "class_ids", seed=nq * ng)
        want = average_precision(q.to(dtype).double(), g.to(dtype).double(), ql, gl)
        got = average_precision(q.to(dtype).cuda(), g.to(dtype).cuda(), ql.cuda(), gl.cuda()).cpu()
        if dtype == torch.float32:  # float32 rounding can swap a rare near-tie: AP moves by little
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-3)
        else:  # float16 scores tie where float64 ones do not: close on average
            assert abs(float(got.mean()) - float(want.mean())) < 0.02


def _duplicates_reference(g):
    dup, rep, first = [], [], {}
    for i, row in enumerate((g + 0).tolist()):  # -0 + 0 = +0
        key = tuple(row)
        if key in first:
            dup.append(i)
            rep.append(first[key])
        else:
            first[key] = i
    return dup, rep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 7, 1500])  # 1500 float64 columns: three hash chunks of 1024 words
def test_hashed_duplicate_rows_find_what_the_exact_search_finds(dtype, d):
    """The CUDA metric kernels' duplicate search: a hash pass answers "none" without the exact
    row sort; when two rows are equal (-0 equal to +0) the exact search gives the pairs."""
    op = torch.ops.sdml._duplicate_rows_hashed
    gen = torch.Generator().manual_seed(d)
    g = torch.randn(60, d, generator=gen).to(dtype)
    g[:, 0] = torch.arange(1, 61, dtype=dtype)  # distinct non-zero rows even in 16-bit formats at d = 1
    dup, rep = op(g)
    assert dup.numel() == 0 and rep.numel() == 0
    if dtype in (torch.float16, torch.bfloat16):
        return  # the exact search runs on CUDA for these (the CPU one takes float32 / float64)
    g[[31, 45, 59]] = g[4].clone()
    g[20] = 0.0
    g[50] = 0.0
    g[50, 0] = -0.0
    g[7] = g[8].clone()
    dup, rep = op(g)
    want_dup, want_rep = _duplicates_reference(g)
    assert dup.tolist() == want_dup == [8, 31, 45, 50, 59] and rep.tolist() == want_rep
