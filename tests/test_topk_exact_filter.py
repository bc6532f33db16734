"""cosine_topk's exact mode on CPUs with bf16 units: on galleries of more than 16,384 items it may
filter with the bf16 pass (csrc/cpu/retrieval/topk_bf16.cpp, as_filter) and must then return its
float32 kernel's ids and scores bit for bit: compared here with SDML_CPU_EXACT_FILTER=off, through
each re-score path (SDML_CPU_BF16_RESCORE: "dots" makes the filter run wherever its pairwise
re-score is proven; "gemm" is never allowed to answer for the exact mode), on awkward shapes."""

from __future__ import annotations

import pytest
import torch

import sdml_ext
from helpers import assert_same, float32_kernel_alone, near_ties
from sdml_ext.ops import cosine_topk

HAS_BF16_UNITS = sdml_ext.build_info()["cpu_bf16"].startswith("bf16 units:")
PATHS = ["auto", "dots", "gemm", "exact"]


@pytest.fixture(params=PATHS)
def rescore(request, monkeypatch):
    monkeypatch.setenv("SDML_CPU_BF16_RESCORE", request.param)
    monkeypatch.delenv("SDML_CPU_EXACT_FILTER", raising=False)
    return request.param


def filtered_and_alone(q, g, k, exclude_self=False):
    got = cosine_topk(q, g, k, exclude_self=exclude_self)
    with float32_kernel_alone():
        want = cosine_topk(q, g, k, exclude_self=exclude_self)
    return want, got


@pytest.mark.parametrize(
    "nq, ng, d, k",
    [
        (3, 16385, 64, 1),       # the least the filter takes: 3 queries, one item past the threshold
        (37, 17411, 40, 7),      # a last gallery block of 3 items (17,411 mod 1,024): a narrow call
        (130, 20000, 33, 50),    # odd d, a query tile count that leaves a short last tile
        (5, 16389, 512, 1000),   # a large k
    ],
)
def test_exact_mode_with_the_filter_is_the_float32_kernel(rescore, nq, ng, d, k):
    gen = torch.Generator().manual_seed(nq * 7 + ng)
    q, g = torch.randn(nq, d, generator=gen), torch.randn(ng, d, generator=gen)
    assert_same(*filtered_and_alone(q, g, k))


def test_exact_mode_with_the_filter_on_near_ties_and_duplicates(rescore):
    q, g = near_ties(n_heads=20, variants=12, n_random=16500, d=64, seed=3)
    for k in (1, 12, 40):
        assert_same(*filtered_and_alone(q, g, k))


def test_exact_mode_with_the_filter_under_exclude_self(rescore):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16400, 24, generator=gen)
    x[100:110] = x[5]  # duplicates of a query's own row
    assert_same(*filtered_and_alone(x, x, 9, exclude_self=True))


def test_exact_mode_with_the_filter_on_non_contiguous_inputs(rescore):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(48, 9, generator=gen).T       # [9, 48], non-contiguous
    g = torch.randn(96, 17000, generator=gen)[::2].T  # [17000, 48], strided
    assert_same(*filtered_and_alone(q, g, 6))


def test_build_info_says_whether_the_exact_mode_filters(monkeypatch):
    status = sdml_ext.build_info()["cpu_exact_filter"]
    assert status.startswith("on: " if HAS_BF16_UNITS else "off: ")
    monkeypatch.setenv("SDML_CPU_EXACT_FILTER", "off")
    assert sdml_ext.build_info()["cpu_exact_filter"].startswith("off: ")
