"""The CPU bf16 top-k's parts (csrc/cpu/retrieval/topk_bf16.cpp and its headers): the rounding
bound and the candidate threshold (checked in exact arithmetic and on rows built to round badly),
the bf16 copies and their terms, the model of the exact kernel's GEMM that re-scores candidates
pair by pair (against exact rational arithmetic), and every re-score path forced in turn on awkward
shapes, near-ties that bf16 misorders, a sample guess that is too high, exclude_self, duplicates
and non-contiguous inputs: always the exact mode's ids and scores."""

import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

import sdml_ext
from sdml_ext import _C
from sdml_ext.ops import cosine_topk

from helpers import CPU_GEMMS, assert_same, assert_same_up_to_gemm_rounding, cpu_kernels, near_ties, topk_gemm  # noqa: F401 (fixture)

HAS_BF16_UNITS = sdml_ext.build_info()["cpu_bf16"].startswith("bf16 units:")
pytestmark = pytest.mark.filterwarnings("ignore:cosine_topk. precision=.bf16. runs the exact mode")

# The re-score paths (SDML_CPU_BF16_RESCORE, read on every call): "dots" prefers the pairwise
# re-score wherever the probe finds the model reproduces the exact kernel's GEMM, "gemm" gathers
# candidates for the GEMM, "auto" lets the kernel choose (and may run the exact kernel).
PATHS = ["auto", "dots", "gemm"]


@pytest.fixture(params=PATHS)
def rescore(request, monkeypatch):
    monkeypatch.setenv("SDML_CPU_BF16_RESCORE", request.param)
    return request.param




# ---- exact arithmetic -------------------------------------------------------------------------


def round_f32(x: Fraction) -> float:
    """x rounded to the nearest float32, ties to even (exactly: the float32 nearest the double
    nearest x is within one float32 step of the answer)."""
    guess = np.float32(float(x))
    best = None
    for c in (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))):
        if not np.isfinite(c):
            continue
        err = abs(Fraction(float(c)) - x)
        even = (int(np.array(c, dtype=np.float32).view(np.uint32)) & 1) == 0
        if best is None or err < best[0] or (err == best[0] and even):
            best = (err, c)
    return float(best[1])


def model_dot(q, x, chunk):
    """The model of the exact kernel's GEMM (exact_dots.h), in exact arithmetic: per chunk of
    coordinates a chain of fused multiply-adds from zero (one rounding each), the chunks' partial
    sums added in order."""
    total = None
    for c0 in range(0, len(q), chunk):
        acc = 0.0
        for k in range(c0, min(len(q), c0 + chunk)):
            acc = round_f32(Fraction(float(q[k])) * Fraction(float(x[k])) + Fraction(acc))
        total = acc if total is None else round_f32(Fraction(total) + Fraction(acc))
    return total


@pytest.mark.parametrize("d, chunk", [(1, 1), (15, 15), (16, 16), (17, 17), (40, 16), (100, 48), (513, 512),
                                      (600, 512)])
def test_exact_dots_kernel_is_the_model(cpu_kernels, d, chunk):
    """The vector kernel (16 pairs per vector, two groups at a time, a chunk's last < 16
    coordinates lane by lane) and the portable one compute the model bit for bit: full and partial
    groups, repeated items, the chunk boundaries."""
    gen = torch.Generator().manual_seed(d + chunk)
    q = torch.randn(d, generator=gen) * torch.exp2(torch.randint(-3, 3, (d,), generator=gen).float())
    g = torch.randn(50, d, generator=gen)
    for m in (1, 5, 16, 17, 33):
        idx = torch.randint(0, 50, (m,), generator=gen)
        got = torch.ops.sdml._exact_dots(q, g, idx, chunk)
        want = [model_dot(q.tolist(), g[i].tolist(), chunk) for i in idx.tolist()]
        assert got.tolist() == want, (m, d, chunk)


def test_exact_dots_checks_its_arguments():
    q, g = torch.randn(8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="idx out of range"):
        torch.ops.sdml._exact_dots(q, g, torch.tensor([5]), 8)
    with pytest.raises(RuntimeError, match="chunk > 0"):
        torch.ops.sdml._exact_dots(q, g, torch.tensor([0]), 0)


def test_probe_finds_no_chunk_for_a_call_the_model_cannot_be_sure_of():
    """The probe answers with a chunk that reproduced every product of its call, or 0; a chunk it
    returns reproduces the GEMM it probed (through the model kernel checked above)."""
    for rows, cols, d in [(16, 64, 64), (3, 5, 600), (256, 1024, 512)]:
        chunk = _C.cpu_exact_dots_chunk(rows, cols, d)
        assert chunk == 0 or 1 <= chunk <= d
    with pytest.raises(RuntimeError, match="sizes must be positive"):
        _C.cpu_exact_dots_chunk(0, 5, 8)


# ---- the bound ----------------------------------------------------------------------------------


def test_bf16_rows_round_to_nearest_even_flush_subnormals_and_bound_their_terms():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 96, generator=gen), dim=1)
    x[3, :5] = torch.tensor([1e-39, -3e-39, 2.0**-127, 1e-45, 0.0])  # subnormal in bf16 (and float32)
    values, terms = torch.ops.sdml._bf16_rows(x)
    assert values.dtype == torch.bfloat16 and terms.dtype == torch.float64 and terms.shape == (40, 3)
    want = x.bfloat16()  # torch rounds to nearest even too, but keeps bf16 subnormals
    want[want.float().abs() < 2.0**-126] = 0
    assert torch.equal(values.view(torch.int16) & 0x7FFF, want.view(torch.int16) & 0x7FFF)
    assert values[3, :5].float().abs().max() == 0
    x64, v64 = x.double(), values.double()
    exact = torch.stack([x64.norm(dim=1), (v64 - x64).norm(dim=1), v64.norm(dim=1)], dim=1)
    assert (terms >= exact).all()  # rounded up
    assert ((terms - exact) / exact).max() < 1e-12


def worst_rounding_rows(n, d, seed):
    """Rows whose every element rounds to bf16 with an error near u_b of itself: mantissas just
    below the midpoint after the first representable step of a binade, random binades and signs."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randint(-9, -3, (n, d), generator=gen).double()
    sign = torch.randint(0, 2, (n, d), generator=gen).double() * 2 - 1
    return (sign * torch.exp2(e) * (1 + 2.0**-8 * 0.999)).float()


def test_bound_holds_and_is_nearly_reached_where_rounding_errors_align():
    """|S - s| <= rho |S| + D for every pair: S the bf16 GEMM's bf16 score (at::mm, as the kernel
    calls it), s a float32 GEMM's. Items round as badly as bf16 allows and each query points along
    an item's rounding error, so the bound's leading term is met: the worst pair reaches most of it."""
    d = 384
    g = worst_rounding_rows(64, d, seed=1)
    err = g.double() - g.bfloat16().double()
    q = torch.cat([(err[:32] / err[:32].norm(dim=1, keepdim=True)).float(),
                   torch.nn.functional.normalize(torch.randn(32, d, generator=torch.Generator().manual_seed(2)), dim=1)])
    S = torch.mm(q.bfloat16(), g.bfloat16().T).double()
    s = torch.mm(q, g.T).double()
    _, q_terms = torch.ops.sdml._bf16_rows(q)
    _, g_terms = torch.ops.sdml._bf16_rows(g)
    rho = _C.bf16_topk_output_rounding()
    D = torch.tensor([[_C.bf16_topk_pair_bound(qt.tolist(), gt.tolist(), d) for gt in g_terms] for qt in q_terms])
    used = (S - s).abs() / (rho * S.abs() + D)
    assert used.max() <= 1
    assert used.max() >= 0.5  # the construction does what it says
    # the gallery's largest terms bound D for every item at once (the kernel's per-query bound)
    g_max = g_terms.max(dim=0).values.tolist()
    D_max = torch.tensor([_C.bf16_topk_pair_bound(qt.tolist(), g_max, d) for qt in q_terms])
    assert (D <= D_max[:, None]).all()


@pytest.mark.parametrize("seed", range(4))
def test_threshold_is_never_above_the_least_score_that_can_reach_the_kth(seed):
    """t = threshold(kappa, D): every S with S + rho|S| + D >= kappa - rho|kappa| - D has S >= t,
    checked in exact arithmetic at t (upper(t) <= lower(kappa)); and t is within a relative 1e-6
    of that least score (the filter keeps no more than the bound asks)."""
    rng = np.random.default_rng(seed)
    rho = Fraction(_C.bf16_topk_output_rounding())
    for kappa, D in [(float(np.float32(rng.uniform(-1, 1))), float(10 ** rng.uniform(-6, -2))) for _ in range(200)] + [
        (0.0, 1e-3), (1e-4, 1e-3), (-1e-4, 1e-3), (1.0, 1e-2), (-1.0, 1e-2)
    ]:
        t = _C.bf16_topk_threshold(kappa, D)
        assert np.float32(t) == t
        Dq, k, tq = Fraction(D), Fraction(kappa), Fraction(t)
        lower = k - rho * abs(k) - Dq
        assert tq + rho * abs(tq) + Dq <= lower
        L = lower - Dq
        least = L / (1 + rho) if L >= 0 else L / (1 - rho)
        assert least - tq <= abs(least) * Fraction(1, 10**6) + Fraction(1, 2**120)
    assert _C.bf16_topk_threshold(-math.inf, 1e-3) == -math.inf


# ---- the kernel, every path ---------------------------------------------------------------------


@pytest.mark.parametrize("nq, ng, d, k", [
    (3, 5, 1, 1),          # the least the bf16 kernel takes
    (4, 1023, 3, 17),      # one partial exact-kernel block
    (5, 1025, 17, 1025),   # k = every item; a last exact-kernel block of one item (a narrow call)
    (17, 1028, 512, 30),   # a narrow last block of four
    (33, 4097, 100, 257),  # chunk = d = 100: six vectors of 16 coordinates and four lane by lane
    (6, 3000, 2048, 5),    # two chunks of 1024
    (9, 2100, 16, 2100),
    (20, 17000, 513, 64),  # a gallery with a sample (>= 16,384 rows); 512 + 1 coordinates
    (7, 16400, 1000, 1),   # 512 + 488 coordinates
])
def test_every_path_equals_exact_on_awkward_shapes(rescore, nq, ng, d, k):
    gen = torch.Generator().manual_seed(nq * ng + d + k)
    q, g = torch.randn(nq, d, generator=gen), torch.randn(ng, d, generator=gen)
    assert_same_up_to_gemm_rounding(q, g, k)


@pytest.mark.parametrize("nq, ng, d, k", [(5, 1025, 17, 1025), (33, 4097, 100, 257), (20, 17000, 513, 64)])
def test_the_portable_kernels_equal_exact(monkeypatch, nq, ng, d, k):
    """The portable scan and pairwise re-score (the only ones on a CPU without AVX-512) through the
    whole search, on the pairwise path."""
    monkeypatch.setenv("SDML_CPU_AVX512", "off")
    monkeypatch.setenv("SDML_CPU_BF16_RESCORE", "dots")
    gen = torch.Generator().manual_seed(nq * ng + d + k)
    q, g = torch.randn(nq, d, generator=gen), torch.randn(ng, d, generator=gen)
    assert_same_up_to_gemm_rounding(q, g, k)
    qt, gt = misordering_near_ties()
    assert_same_up_to_gemm_rounding(qt, gt, 20)


def misordering_near_ties(n_heads=20, variants=40, n_random=2000, d=256, seed=0):
    """Clusters of rows a few 1e-5 apart in exact score around each query's k-th place, among
    random rows: bf16's rounding (~1e-3) reorders them, so the bf16 top k is not the exact one."""
    gen = torch.Generator().manual_seed(seed)
    heads = torch.nn.functional.normalize(torch.randn(n_heads, d, generator=gen), dim=1)
    rows = [torch.randn(n_random, d, generator=gen)]
    rows += [h + 2e-2 / d**0.5 * torch.randn(variants, d, generator=gen) for h in heads]
    gallery = torch.cat(rows)
    gallery = gallery[torch.randperm(gallery.shape[0], generator=gen)]
    queries = heads + 0.2 / d**0.5 * torch.randn(n_heads, d, generator=gen)
    return queries, gallery


@pytest.mark.parametrize("k", [5, 20, 39])
def test_every_path_equals_exact_where_bf16_misorders(rescore, k):
    q, g = misordering_near_ties()
    qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    bf16_top = torch.topk((qn.bfloat16() @ gn.bfloat16().T).float(), k, dim=1).indices.sort(dim=1).values
    exact_top = cosine_topk(q, g, k).indices.sort(dim=1).values
    assert (bf16_top != exact_top).any(dim=1).float().mean() > 0.5  # the data does what it says
    assert_same_up_to_gemm_rounding(q, g, k)


@pytest.mark.parametrize("k", [1, 7, 64])
def test_every_path_keeps_exclude_self_duplicates_and_near_ties(rescore, k):
    q, g = near_ties(n_heads=20, variants=6, n_random=500, d=64, seed=3)
    assert_same_up_to_gemm_rounding(g, g, k, exclude_self=True)
    assert_same_up_to_gemm_rounding(q, g, k)


def test_every_path_on_non_contiguous_inputs(rescore):
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(40, 600, generator=gen)[:, ::2]
    g = torch.randn(300, 5000, generator=gen).t()[:, :300]
    assert not q.is_contiguous() and not g.is_contiguous()
    assert_same_up_to_gemm_rounding(q, g, 23)


def test_a_sample_guess_above_the_final_kth_is_searched_again(rescore):
    """Every 16th gallery row (the sample behind each query's guess of its k-th best bf16 score)
    is close to the queries, the rest is not: the sample's kth-best is far above the gallery's k-th
    best, every query's guess is too high, and each is searched again without it."""
    ng, d, k = 20000, 64, 600
    gen = torch.Generator().manual_seed(11)
    base = torch.nn.functional.normalize(torch.randn(1, d, generator=gen), dim=1)
    g = torch.randn(ng, d, generator=gen)
    g[::16] = base + 0.3 * torch.randn(len(range(0, ng, 16)), d, generator=gen) / d**0.5
    q = base + 0.3 * torch.randn(12, d, generator=gen) / d**0.5
    # the guess the kernel makes (topk_bf16.cpp: kth = ceil(1.25 e + 4 sqrt(e) + 2), e = k n / Ng)
    n = len(range(0, ng, 16))
    e = k * n / ng
    kth = math.ceil(1.25 * e + 4 * math.sqrt(e) + 2)
    qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    S = (qn.bfloat16() @ gn.bfloat16().T).float()
    guess = S[:, ::16].topk(kth, dim=1).values[:, -1]
    final = S.topk(k, dim=1).values[:, -1]
    assert (guess > final).all()
    assert_same_up_to_gemm_rounding(q, g, k)


@pytest.mark.parametrize("ng", [3000, 17000])
def test_every_path_when_every_item_ties(rescore, ng):
    """One row repeated (a few nudged): every bf16 score equals the k-th, so every item is a
    candidate (lists grow to the gallery, the selection sees one key), and the exact mode's
    order among duplicates is by index."""
    gen = torch.Generator().manual_seed(ng)
    g = torch.randn(1, 64, generator=gen).repeat(ng, 1)
    g[::7] += 1e-3 * torch.randn(len(range(0, ng, 7)), 64, generator=gen)
    q = torch.cat([torch.randn(3, 64, generator=gen), g[:3] + 1e-2 * torch.randn(3, 64, generator=gen)])
    for k in (1, 10, ng - 1):
        assert_same_up_to_gemm_rounding(q, g, k)
    assert_same_up_to_gemm_rounding(g[:50].clone(), g[:50].clone(), 10, exclude_self=True)


def test_the_other_gemm_library_on_these_cases():
    """This process's top-k GEMM is one of them; a fresh process forced to each other one runs the
    awkward shapes and the misordering near-ties on every path (with MKL/BLAS the model of the
    GEMM need not hold, and the gathered GEMM re-score answers)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for other in (g for g in CPU_GEMMS if g != topk_gemm()):
        env = {**os.environ, "SDML_CPU_GEMM": other, "SDML_CACHE_DIR": "off"}
        proc = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-p", "no:cacheprovider",
                               "-k", "awkward or misorders"], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_a_bad_path_name_is_refused(monkeypatch):
    monkeypatch.setenv("SDML_CPU_BF16_RESCORE", "fast")
    q, g = torch.randn(5, 8), torch.randn(20, 8)
    if not HAS_BF16_UNITS:  # the bf16 kernel (which reads the variable) never runs
        assert_same(cosine_topk(q, g, 3), cosine_topk(q, g, 3, precision="bf16"))
        return
    with pytest.raises(ValueError, match='SDML_CPU_BF16_RESCORE must be auto, dots, gemm or exact, got "fast"'):
        cosine_topk(q, g, 3, precision="bf16")
