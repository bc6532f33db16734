"""Retrieval ops against the alternatives, side by side in one run: cosine top-k (sdml vs
torch mm+topk vs faiss IndexFlatIP) and mAP@all (sdml vs a vectorized torch implementation).

Run: .venv/bin/python -m pytest benchmarks/bench_retrieval.py --benchmark-group-by=group
The issue's full sizes (top-k 10,000 x 100,000; mAP 23,661^2 and 30,137^2) are marked ``large``
and run once each only with SDML_BENCH_LARGE=1 (minutes on 2 cores). Every case first checks
that the alternatives agree, then times them. ``extra_info``: GFLOP/s of the similarity GEMM and
its ratio to this machine's measured GEMM rate (CPU), peak memory of one call (MB above the
inputs: RSS sampled on CPU, the CUDA allocator's peak on GPU), and the machine load.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from common import load_note, measured_gemm_rate
from sdml_ext.ops import average_precision, cosine_topk

try:
    import faiss
except ImportError:  # benchmark-only dependency (pip install faiss-cpu, or the "bench" extra)
    faiss = None

LARGE = os.environ.get("SDML_BENCH_LARGE") == "1"
large = pytest.mark.skipif(not LARGE, reason="full issue size: set SDML_BENCH_LARGE=1 (minutes on 2 cores)")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Query rows per chunk of the torch alternatives (bounds their [chunk, Ng] temporaries).
TORCH_CHUNK = 1024


@pytest.fixture(scope="session")
def gemm_rate() -> float:
    return measured_gemm_rate()


def embeddings(n, d, seed, device, classes=10, multi=False, noise=3.0):
    """Class-structured embeddings (mAP around 0.6-0.75, like trained SDML codes) and labels."""
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    if multi:
        labels = torch.rand(n, classes, generator=gen) < 2.9 / classes
        x = labels.float() @ centers
    else:
        labels = torch.randint(0, classes, (n,), generator=gen)
        x = centers[labels]
    x = x + noise * torch.randn(n, d, generator=gen)
    return x.to(device), labels.to(device)


# ---- alternatives ---------------------------------------------------------------------------------


def torch_topk(query, gallery, k):
    """mm + topk per query chunk on normalized inputs (torch.topk leaves tie order unspecified)."""
    q = torch.nn.functional.normalize(query, dim=1)
    g = torch.nn.functional.normalize(gallery, dim=1)
    parts = [torch.topk(q[i : i + TORCH_CHUNK] @ g.T, k, dim=1) for i in range(0, q.shape[0], TORCH_CHUNK)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def faiss_topk(index, query, k):
    q = torch.nn.functional.normalize(query, dim=1).numpy()
    scores, idx = index.search(q, k)
    return torch.from_numpy(scores), torch.from_numpy(idx)


def faiss_index(gallery):
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(torch.nn.functional.normalize(gallery, dim=1).numpy())
    return index


def torch_map(query, gallery, query_labels, gallery_labels):
    """mAP@all vectorized in torch: per query chunk a GEMM, a full stable sort, cumsum over the
    sorted relevance (the authors' rule: AP divided by the hits, 0 without hits)."""
    q = torch.nn.functional.normalize(query, dim=1)
    g = torch.nn.functional.normalize(gallery, dim=1)
    multi = query_labels.dim() == 2
    total = 0.0
    for i in range(0, q.shape[0], TORCH_CHUNK):
        order = torch.sort(q[i : i + TORCH_CHUNK] @ g.T, dim=1, descending=True, stable=True).indices
        ql = query_labels[i : i + TORCH_CHUNK]
        if multi:
            rel = (ql.float() @ gallery_labels.float().T > 0).gather(1, order)
        else:
            rel = gallery_labels[order] == ql[:, None]
        rel = rel.double()
        hits = rel.cumsum(1)
        prec = hits / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64, device=rel.device)
        r = rel.sum(1)
        total += float(torch.where(r > 0, (prec * rel).sum(1) / r.clamp_min(1), torch.zeros_like(r)).sum())
    return total / q.shape[0]


# ---- measuring ----------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_mb(fn, device) -> float:
    """Peak memory of one call of fn above what was in use before it, in MB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0] - base, 0) / 2**20


def record(benchmark, group, device, flop, gemm_rate, peak_mb):
    benchmark.group = group
    benchmark.extra_info["peak_extra_MB"] = peak_mb
    benchmark.extra_info["load"] = load_note()
    benchmark.extra_info["gemm_GFLOP"] = flop / 1e9
    if device == "cpu":
        benchmark.extra_info["machine_gemm_GFLOPps"] = gemm_rate / 1e9


def finish(benchmark, flop, gemm_rate, device):
    median = benchmark.stats.stats.median
    benchmark.extra_info["GFLOPps"] = flop / median / 1e9
    if device == "cpu":
        benchmark.extra_info["of_gemm_rate"] = flop / median / gemm_rate


def sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# ---- top-k -----------------------------------------------------------------------------------------------

TOPK_CASES = [
    pytest.param(2000, 20000, 50, id="2000x20000_k50"),
    pytest.param(2000, 20000, 1000, id="2000x20000_k1000"),
    pytest.param(10000, 100000, 50, id="10000x100000_k50", marks=large),
    pytest.param(10000, 100000, 1000, id="10000x100000_k1000", marks=large),
]


@pytest.mark.parametrize("impl", ["sdml", "torch_mm_topk", "faiss_flat_ip"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq, ng, k", TOPK_CASES)
def test_topk(benchmark, nq, ng, k, device, impl, gemm_rate):
    if impl == "faiss_flat_ip" and (faiss is None or device != "cpu"):
        pytest.skip("faiss-cpu is not installed" if faiss is None else "faiss-cpu runs on CPU only")
    query, _ = embeddings(nq, 512, 0, device)
    gallery, _ = embeddings(ng, 512, 1, device)
    index = faiss_index(gallery) if impl == "faiss_flat_ip" else None
    fn = {
        "sdml": lambda: cosine_topk(query, gallery, k),
        "torch_mm_topk": lambda: torch_topk(query, gallery, k),
        "faiss_flat_ip": lambda: faiss_topk(index, query, k),
    }[impl]
    # Correctness first: the k best scores agree with torch's (float32 rounding aside).
    check = slice(0, 200)
    got_scores, got_idx = fn()
    want_scores, _ = torch_topk(query[check], gallery, k)
    torch.testing.assert_close(got_scores[check].float().cpu(), want_scores.cpu(), rtol=0, atol=2e-5)
    assert got_idx.shape == (nq, k)
    flop = 2.0 * nq * ng * 512
    record(benchmark, f"topk {device} {nq}x{ng} d512 k{k}", device, flop, gemm_rate, peak_extra_mb(fn, device))
    wait = sync(device)
    benchmark.pedantic(lambda: (fn(), wait()), rounds=1 if nq >= 10000 else 3, warmup_rounds=0)
    finish(benchmark, flop, gemm_rate, device)


# ---- mAP@all ---------------------------------------------------------------------------------------------

MAP_CASES = [
    pytest.param(4000, 10, False, id="single_4000_c10"),
    pytest.param(4000, 80, True, id="multi_4000_c80"),
    pytest.param(23661, 10, False, id="single_23661_c10", marks=large),
    pytest.param(30137, 80, True, id="multi_30137_c80", marks=large),
]


@pytest.mark.parametrize("impl", ["sdml", "torch_vectorized"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, classes, multi", MAP_CASES)
def test_map_at_all(benchmark, n, classes, multi, device, impl, gemm_rate):
    query, ql = embeddings(n, 512, 0, device, classes, multi)
    gallery, gl = embeddings(n, 512, 1, device, classes, multi)

    def ours():
        return float(average_precision(query, gallery, ql, gl).mean())

    fn = {"sdml": ours, "torch_vectorized": lambda: torch_map(query, gallery, ql, gl)}[impl]
    if n <= 4000:  # the large cases were checked at this size; a second full run costs minutes
        assert abs(ours() - torch_map(query, gallery, ql, gl)) < 1e-4
    flop = 2.0 * n * n * 512
    label = "multi-label" if multi else "single-label"
    record(benchmark, f"mAP@all {device} {label} {n}x{n} d512 c{classes}", device, flop, gemm_rate,
           peak_extra_mb(fn, device))
    wait = sync(device)
    benchmark.pedantic(lambda: (fn(), wait()), rounds=1 if n > 4000 else 3, warmup_rounds=0)
    finish(benchmark, flop, gemm_rate, device)
