"""cosine_topk's precision modes on the CPU: "bf16" returns exactly the exact mode's ids and scores
(random data, near-ties of a few ulps, exact duplicates, exclude_self, k = 1 / odd / large, float64),
"tf32" and "bf16" without bf16 units run the exact mode with a warning, bad values are refused."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import sdml_ext
from sdml_ext.ops import cosine_topk

from helpers import CPU_GEMMS, assert_same, assert_same_up_to_gemm_rounding, both, near_ties, topk_gemm

HAS_BF16_UNITS = sdml_ext.build_info()["cpu_bf16"].startswith("bf16 units:")
# Where the CPU lacks the units, "bf16" runs the exact mode and says so once: expected there.
pytestmark = pytest.mark.filterwarnings("ignore:cosine_topk. precision=.bf16. runs the exact mode")


@pytest.mark.parametrize("nq, ng, d, k", [(3, 5, 1, 1), (4, 40, 7, 3), (300, 5000, 512, 10), (257, 3001, 64, 1),
                                          (100, 4097, 33, 999), (65, 1030, 512, 1030), (40, 2000, 128, 2000),
                                          (17, 2050, 20, 7), (18, 1028, 512, 30), (34, 3000, 16, 5)])
def test_bf16_ids_equal_exact_on_random_data(nq, ng, d, k):
    g = torch.Generator().manual_seed(nq + ng + d + k)
    q, gal = torch.randn(nq, d, generator=g), torch.randn(ng, d, generator=g)
    assert_same_up_to_gemm_rounding(q, gal, k)


@pytest.mark.parametrize("k", [1, 5, 12, 13, 37])
def test_bf16_ids_equal_exact_on_near_ties_and_duplicates(k):
    q, gal = near_ties()
    # the data does what it says: near-ties and exact ties among the exact mode's top k
    top = cosine_topk(q, gal, k).scores
    assert (top[:, 1:] == top[:, :-1]).any() or k == 1
    assert_same_up_to_gemm_rounding(q, gal, k)


def test_bf16_exclude_self_and_duplicates_of_self():
    q, gal = near_ties(n_heads=20, variants=6, n_random=500, d=64, seed=3)
    for k in (1, 7, 64):
        assert_same_up_to_gemm_rounding(gal, gal, k, exclude_self=True)


def test_bf16_on_float64_is_the_exact_float64_mode():
    g = torch.Generator().manual_seed(5)
    q, gal = torch.randn(50, 48, generator=g, dtype=torch.float64), torch.randn(900, 48, generator=g, dtype=torch.float64)
    exact, fast = both(q, gal, 9)
    assert fast.scores.dtype == torch.float64
    assert_same(exact, fast)


@pytest.mark.parametrize("nq", [1, 2])
def test_bf16_with_one_or_two_queries_is_the_exact_mode(nq):
    g = torch.Generator().manual_seed(nq)
    q, gal = torch.randn(nq, 512, generator=g), torch.randn(2050, 512, generator=g)
    assert_same_up_to_gemm_rounding(q, gal, 10)


def test_bf16_non_contiguous_inputs():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(64, 200, generator=g)[:, ::2]
    gal = torch.randn(100, 3000, generator=g).t()[:, :100]
    assert not q.is_contiguous() and not gal.is_contiguous()
    assert_same_up_to_gemm_rounding(q, gal, 11)


@pytest.mark.parametrize("precision", ["exact", "bf16", "tf32"])
def test_opcheck(precision):
    g = torch.Generator().manual_seed(2)
    q, gal = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.opcheck(torch.ops.sdml.cosine_topk.default, (q, gal, 4, False, precision))
        torch.library.opcheck(torch.ops.sdml.cosine_topk.default, (gal, gal, 4, True, precision))


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("bad", ["fp32", "BF16", "", "exact "])
def test_bad_precision_names_the_argument(bad, fake):
    q, gal = torch.randn(5, 8), torch.randn(20, 8)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            q, gal = mode.from_tensor(q), mode.from_tensor(gal)
            with pytest.raises(ValueError, match=r'precision must be "exact", "tf32" or "bf16", got "'):
                cosine_topk(q, gal, 3, precision=bad)
    else:
        with pytest.raises(ValueError, match=r'precision must be "exact", "tf32" or "bf16", got "'):
            cosine_topk(q, gal, 3, precision=bad)


def _warnings_of(code: str, **env) -> str:
    """stderr of a fresh interpreter running `code` (each warning once per process)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


CALL_TWICE = (
    "import torch, sdml_ext\nfrom sdml_ext.ops import cosine_topk\n"
    "q, g = torch.randn(8, 16), torch.randn(50, 16)\n"
    "a = cosine_topk(q, g, 5)\n"
    "for _ in range(2):\n"
    "    b = cosine_topk(q, g, 5, precision='{precision}')\n"
    "    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)\n"
    "print(sdml_ext.build_info()['cpu_bf16'])\n"
)


def test_tf32_on_cpu_runs_exact_and_warns_once():
    out = _warnings_of(CALL_TWICE.format(precision="tf32"))
    assert out.count('precision="tf32" is a GPU mode; on the CPU it runs the exact mode') == 1


def test_bf16_without_units_runs_exact_and_warns_once():
    out = _warnings_of(CALL_TWICE.format(precision="bf16"), SDML_CPU_BF16="off")
    assert out.count('precision="bf16" runs the exact mode on this CPU') == 1
    assert "runs the exact fp32 mode" in out  # build_info says so too


@pytest.mark.skipif(not HAS_BF16_UNITS, reason="this CPU has no bf16 units")
def test_bf16_with_units_does_not_warn():
    out = _warnings_of(CALL_TWICE.format(precision="bf16"))
    assert "runs the exact mode" not in out
    assert "bf16 units: " in out


def test_build_info_reports_the_cpu_bf16_units():
    status = sdml_ext.build_info()["cpu_bf16"]
    assert isinstance(status, str) and ("bf16 units: " in status or "exact fp32 mode" in status)


@pytest.mark.parametrize("k", [5, 2000])
def test_bf16_past_the_probe_size_sparse_and_dense_candidates(k):
    # Ng > 16,384: a probe decides; k = 2000 of 20,000 gives dense candidates (the exact kernel
    # runs), k = 5 sparse ones (the bf16 search). Both return the exact mode's answer.
    g = torch.Generator().manual_seed(k)
    q, gal = torch.randn(40, 64, generator=g), torch.randn(20001, 64, generator=g)
    assert_same_up_to_gemm_rounding(q, gal, k)


def test_the_other_gemm_library_keeps_the_contract():
    """This process runs the top-k blocks on one GEMM; a fresh process forced to each other one
    runs the random-data and near-tie cases, so every rule is tested on every machine."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for other in (g for g in CPU_GEMMS if g != topk_gemm()):
        env = {**os.environ, "SDML_CPU_GEMM": other, "SDML_CACHE_DIR": "off"}
        proc = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-p", "no:cacheprovider",
                               "-k", "random_data or near_ties"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and " failed" not in proc.stdout
