"""Retrieval ops against the alternatives, interleaved in one process: cosine top-k (sdml exact and
precision="bf16" vs torch mm+topk vs faiss IndexFlatIP), mAP@all (sdml vs the GEMM alone: torch.mm of the same normalized
matrices in 1,024-row blocks into a preallocated output), and both directions of a modality pair
(sdml's one-GEMM pair op vs two one-direction calls).

  .venv/bin/python -P benchmarks/bench_retrieval.py [--rounds 3] [--json OUT]   # a table
  .venv/bin/python -m pytest benchmarks/bench_retrieval.py                       # same, small sizes

Each round runs every alternative of a case once, in a rotated order, after recording the
one-minute load; the median over rounds (>= 3) is reported with the ratios, and the fp32 GEMM
rate is measured in the same run. Wall time is the measure; process CPU time is recorded too (on
a loaded machine, CPU time / wall time < threads says other processes took cores). Every case
first checks that the alternatives agree. SDML_BENCH_LARGE=1 runs the full sizes (top-k 10,000 x
100,000 at k = 10, 50, 1000 and 1,000 x 1,000,000 at k = 50; 1, 8, 64 queries x 100,000 at k = 10; mAP 23,661² single-label and
30,137² multi-label): tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import measured_copy_bandwidth, measured_gemm_rate  # noqa: E402
import sdml_ext  # noqa: E402
from sdml_ext.ops import average_precision, average_precision_pair, cosine_topk  # noqa: E402

try:
    import faiss
except ImportError:  # benchmark-only dependency (pip install faiss-cpu, or the "bench" extra)
    faiss = None

LARGE = os.environ.get("SDML_BENCH_LARGE") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Query rows per chunk of the torch alternatives (bounds their [chunk, Ng] temporaries).
TORCH_CHUNK = 1024
D = 512


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


def faiss_index(gallery):
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(torch.nn.functional.normalize(gallery, dim=1).numpy())
    return index


def faiss_topk(index, query, k):
    scores, idx = index.search(torch.nn.functional.normalize(query, dim=1).numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(idx)


def gemm_blocks(query, gallery, out):
    """The similarity GEMM alone: normalized query rows in 1,024-row blocks times the normalized
    gallery into a preallocated [1024, Ng] output (the floor any exact mAP@all pays)."""
    q = torch.nn.functional.normalize(query, dim=1)
    g = torch.nn.functional.normalize(gallery, dim=1)
    for i in range(0, q.shape[0], TORCH_CHUNK):
        n = min(TORCH_CHUNK, q.shape[0] - i)
        torch.mm(q[i : i + n], g.T, out=out[:n])


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


# ---- the interleaved harness ------------------------------------------------------------------------


def interleaved(alternatives: dict, rounds: int, device: str) -> dict:
    """Runs every alternative once per round, in an order rotated each round; returns per
    alternative the wall and process-CPU seconds of each round, and the load before each round."""
    wait = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names = list(alternatives)
    out = {"load1": [], **{n: {"wall": [], "cpu": []} for n in names}}
    for r in range(rounds):
        out["load1"].append(round(os.getloadavg()[0], 2))
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wait()
            c0, t0 = time.process_time(), time.perf_counter()
            alternatives[name]()
            wait()
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    for name in names:
        out[name]["median_wall"] = statistics.median(out[name]["wall"])
        out[name]["median_cpu"] = statistics.median(out[name]["cpu"])
    return out


def _float32_alone(fn, *args):
    """fn(*args) with cosine_topk's exact mode as its float32 kernel alone (no bf16 filter)."""
    old = os.environ.get("SDML_CPU_EXACT_FILTER")
    os.environ["SDML_CPU_EXACT_FILTER"] = "off"
    try:
        return fn(*args)
    finally:
        if old is None:
            del os.environ["SDML_CPU_EXACT_FILTER"]
        else:
            os.environ["SDML_CPU_EXACT_FILTER"] = old


def topk_case(nq, ng, ks, device, rounds):
    query, _ = embeddings(nq, D, 0, device)
    gallery, _ = embeddings(ng, D, 1, device)
    index = faiss_index(gallery) if faiss is not None and device == "cpu" else None
    results = {}
    for k in ks:
        alts = {"sdml": lambda: cosine_topk(query, gallery, k), "torch_mm_topk": lambda: torch_topk(query, gallery, k)}
        if index is not None:
            alts["faiss_flat_ip"] = lambda: faiss_topk(index, query, k)
        if device == "cpu":  # runs the exact mode (and says so) where the CPU has no bf16 units
            alts["sdml_bf16"] = lambda: cosine_topk(query, gallery, k, precision="bf16")
            # The exact mode without its bf16 filter (where the CPU has bf16 units): the float32 kernel alone.
            alts["sdml_fp32_alone"] = lambda: _float32_alone(cosine_topk, query, gallery, k)
        # Correctness first: the k best scores agree with torch's (float32 rounding aside).
        check = slice(0, 100)
        want, _ = torch_topk(query[check], gallery, k)
        for name, fn in alts.items():
            got_scores, got_idx = fn()
            assert got_idx.shape == (nq, k), name
            torch.testing.assert_close(got_scores[check].float().cpu(), want.cpu(), rtol=0, atol=2e-5)
        if "sdml_bf16" in alts:  # the contract: the float32 kernel's ids and scores, all queries
            alone = alts["sdml_fp32_alone"]()
            for name in ("sdml", "sdml_bf16"):
                got = alts[name]()
                assert torch.equal(alone.indices, got.indices) and torch.equal(alone.scores, got.scores), name
        results[f"topk {device} {nq}x{ng} d{D} k{k}"] = dict(
            interleaved(alts, rounds, device), gemm_GFLOP=2.0 * nq * ng * D / 1e9
        )
    return results


def small_query_case(ng, nqs, k, device, rounds):
    """A few queries against a large gallery (an interactive search): per-call work over the
    whole gallery (normalisation, duplicate detection) and using every thread for few queries."""
    gallery, _ = embeddings(ng, D, 1, device)
    index = faiss_index(gallery) if faiss is not None and device == "cpu" else None
    results = {}
    for nq in nqs:
        query, _ = embeddings(nq, D, 0, device)
        alts = {"sdml": lambda: cosine_topk(query, gallery, k),
                "torch_mm_topk": lambda: torch_topk(query, gallery, k)}
        if index is not None:
            alts["faiss_flat_ip"] = lambda: faiss_topk(index, query, k)
        want, _ = torch_topk(query, gallery, k)
        for name, fn in alts.items():
            torch.testing.assert_close(fn()[0].float().cpu(), want.cpu(), rtol=0, atol=2e-5)
        results[f"topk-small {device} {nq}x{ng} d{D} k{k}"] = dict(
            interleaved(alts, rounds, device), gemm_GFLOP=2.0 * nq * ng * D / 1e9)
    return results


def map_case(n, classes, multi, device, rounds, vectorized=False):
    query, ql = embeddings(n, D, 0, device, classes, multi)
    gallery, gl = embeddings(n, D, 1, device, classes, multi)
    out = torch.empty(TORCH_CHUNK, n, device=device)
    mean_ap = float(average_precision(query, gallery, ql, gl).mean())
    if n <= 4000:
        assert abs(mean_ap - torch_map(query, gallery, ql, gl)) < 1e-4
    alts = {
        "sdml": lambda: average_precision(query, gallery, ql, gl),
        "gemm_1024_blocks": lambda: gemm_blocks(query, gallery, out),
        "sdml_pair_both_directions": lambda: average_precision_pair(query, gallery, ql, gl),
        "sdml_two_calls_both_directions": lambda: (average_precision(query, gallery, ql, gl),
                                                   average_precision(gallery, query, gl, ql)),
    }
    if vectorized:
        alts["torch_vectorized"] = lambda: torch_map(query, gallery, ql, gl)
    label = "multi-label" if multi else "single-label"
    return {f"mAP@all {device} {label} {n}x{n} d{D} c{classes} (mAP {mean_ap:.2f})": dict(
        interleaved(alts, rounds, device), gemm_GFLOP=2.0 * n * n * D / 1e9)}


def cases(device, rounds, large=LARGE):
    results = {}
    if large:
        results.update(topk_case(10000, 100000, [10, 50, 1000], device, rounds))
        results.update(topk_case(1000, 1000000, [50], device, rounds))
        results.update(map_case(23661, 10, False, device, rounds))
        results.update(map_case(30137, 80, True, device, rounds))
    else:
        results.update(topk_case(2000, 20000, [10, 50, 1000], device, rounds))
        results.update(map_case(4000, 10, False, device, rounds, vectorized=True))
        results.update(map_case(4000, 80, True, device, rounds, vectorized=True))
    return results


def table(results, gemm_rate) -> str:
    lines = [f"GEMM rate measured in this run: {gemm_rate / 1e9:.0f} GFLOP/s (fp32, {torch.get_num_threads()} threads)",
             "| case | load1 per round | alternative | median wall s | ratio to first | median CPU s | GFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for case, r in results.items():
        names = [n for n in r if isinstance(r[n], dict)]
        first = r[names[0]]["median_wall"]
        for n in names:
            w = r[n]["median_wall"]
            lines.append(f"| {case} | {r['load1']} | {n} | {w:.3f} | {w / first:.2f} | {r[n]['median_cpu']:.3f} "
                         f"| {r['gemm_GFLOP'] / w:.0f} |")
    return "\n".join(lines)


# ---- pytest: the small cases (the harness, its checks and the ratios into extra_info) --------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["topk", "topk_small", "map_single", "map_multi"])
def test_retrieval_interleaved(benchmark, kind, device):
    run = {
        "topk": lambda: topk_case(2000, 20000, [10, 50, 1000], device, 3),
        "topk_small": lambda: small_query_case(20000, [1, 8, 64], 10, device, 3),
        "map_single": lambda: map_case(4000, 10, False, device, 3),
        "map_multi": lambda: map_case(4000, 80, True, device, 3),
    }[kind]
    results = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["gemm_rate_GFLOPps"] = measured_gemm_rate() / 1e9
    benchmark.extra_info["results"] = results


def machine_line() -> str:
    """The machine the figures come from: CPU model, ISA, threads, measured fp32 GEMM rate and copy
    bandwidth, the load, and the CPU tile GEMM sdml_ext chose (python -m sdml_ext.info)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ",".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "?"
    gemm = sdml_ext.build_info()["cpu_gemm"]
    rates = gemm.get("measured_gflops", {})
    return (f"machine: {model}; ISA {isa}; {torch.get_num_threads()} threads; fp32 GEMM "
            f"{measured_gemm_rate() / 1e9:.0f} GFLOP/s (2048², torch); copy {measured_copy_bandwidth() / 1e9:.1f} GB/s; "
            f"load1 {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; sdml tile GEMM: {gemm['gemm']} ({gemm['how']}"
            + (f", blas {rates['blas']:.0f} / onednn {rates['onednn']:.0f} GFLOP/s" if rates else "") + ")")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", action="store_true", default=LARGE, help="the full sizes (SDML_BENCH_LARGE=1)")
    parser.add_argument("--only", default="", choices=["", "topk", "small", "mAP", "bf16"],
                        help="run only these cases: topk (large batches), small (1, 8, 64 queries), mAP, "
                             "bf16 (top-k 4,000 x 100,000 at k = 10, 50, 1000: the bf16 mode's target case)")
    parser.add_argument("--targets", action="store_true",
                        help="the sizes the CPU targets are stated for: top-k 4,000 x 100,000 at k = 10, 50, "
                             "1000 and mAP@all 23,661² single-label (minutes on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the median of fewer says little on a shared machine)")
    print(machine_line(), flush=True)
    gemm_rate = measured_gemm_rate()
    results = {}
    if args.targets:
        if args.only in ("", "topk"):
            results.update(topk_case(4000, 100000, [10, 50, 1000], "cpu", args.rounds))
            print(table(results, gemm_rate), flush=True)
        if args.only in ("", "mAP"):
            results.update(map_case(23661, 10, False, "cpu", args.rounds))
            print(table(results, gemm_rate), flush=True)
    for device in ([] if args.targets else DEVICES):
        if args.only in ("", "topk"):
            sizes = [(10000, 100000, [10, 50, 1000]), (1000, 1000000, [50])] if args.large else [(2000, 20000, [10, 50, 1000])]
            for nq, ng, ks in sizes:
                results.update(topk_case(nq, ng, ks, device, args.rounds))
                print(table(results, gemm_rate), flush=True)
        if args.only == "bf16":
            results.update(topk_case(4000, 100000, [10, 50, 1000], device, args.rounds))
            print(table(results, gemm_rate), flush=True)
        if args.only in ("", "small"):
            results.update(small_query_case(100000 if args.large else 20000, [1, 8, 64], 10, device,
                                            max(args.rounds, 5)))
            print(table(results, gemm_rate), flush=True)
        if args.only in ("", "mAP"):
            for n, classes, multi in ([(23661, 10, False), (30137, 80, True)] if args.large else [(4000, 10, False), (4000, 80, True)]):
                results.update(map_case(n, classes, multi, device, args.rounds, vectorized=not args.large))
                print(table(results, gemm_rate), flush=True)
    gemm_after = measured_gemm_rate()
    print(f"GEMM rate after the run: {gemm_after / 1e9:.0f} GFLOP/s")
    if args.json:
        args.json.write_text(json.dumps({"gemm_rate": gemm_rate, "gemm_rate_after": gemm_after,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
