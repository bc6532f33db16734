"""GPU check of the retrieval ops at full dataset sizes (top-k 10,000 x 100,000; mAP at the
NUS-WIDE and MS-COCO test-set sizes, 23,661^2 and 30,137^2), run by benchmarks/gpu_check.sh on a GPU
host; about a minute on an H200.

  python -P benchmarks/gpu_check_retrieval.py [--out DIR]

For each case it checks the CUDA op against the CPU op on a slice of the queries, then times the
CUDA op and the torch alternative (median of 3, CUDA events) and reports GFLOP/s of the
similarity GEMM and the CUDA allocator's peak above the inputs. Writes retrieval_gpu.json to DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_retrieval import embeddings, torch_map, torch_topk  # noqa: E402
from sdml_ext.ops import average_precision, average_precision_pair, cosine_topk  # noqa: E402

CHECK_ROWS = 64


def timed(fn, rounds=3):
    """Median seconds of fn over `rounds` (after one warm-up) and the allocator's peak in MB."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def check_topk(nq, ng, k):
    q, _ = embeddings(nq, 512, 0, "cuda")
    g, _ = embeddings(ng, 512, 1, "cuda")
    ours = cosine_topk(q[:CHECK_ROWS], g, k)
    cpu = cosine_topk(q[:CHECK_ROWS].cpu(), g.cpu(), k)
    ok = torch.allclose(ours.scores.cpu(), cpu.scores, rtol=0, atol=1e-5)
    sec, peak = timed(lambda: cosine_topk(q, g, k))
    alt, alt_peak = timed(lambda: torch_topk(q, g, k))
    return dict(case=f"topk {nq}x{ng} d512 k{k}", check_vs_cpu=ok, sdml_s=sec, torch_mm_topk_s=alt,
                ratio=alt / sec, sdml_GFLOPps=2 * nq * ng * 512 / sec / 1e9, sdml_peak_MB=peak,
                torch_peak_MB=alt_peak)


def check_map(n, classes, multi):
    q, ql = embeddings(n, 512, 0, "cuda", classes, multi)
    g, gl = embeddings(n, 512, 1, "cuda", classes, multi)
    ours = average_precision(q[:CHECK_ROWS], g, ql[:CHECK_ROWS], gl)
    cpu = average_precision(q[:CHECK_ROWS].cpu(), g.cpu(), ql[:CHECK_ROWS].cpu(), gl.cpu())
    # float32 GEMMs round differently on the two devices: near-ties may swap, AP moves slightly.
    ok = float((ours.cpu() - cpu).abs().max()) < 1e-3
    # The one-GEMM pair against the two one-direction calls: a->b runs the same GEMM tiles
    # (equal); b->a reads the transpose of a's tiles, so only rounding-level near-ties may swap.
    pair = average_precision_pair(q, g, ql, gl)
    ok = ok and torch.equal(pair[0], average_precision(q, g, ql, gl)) and float(
        (pair[1] - average_precision(g, q, gl, ql)).abs().max()) < 1e-3
    sec, peak = timed(lambda: average_precision(q, g, ql, gl))
    pair_sec, _ = timed(lambda: average_precision_pair(q, g, ql, gl))
    alt, alt_peak = timed(lambda: torch_map(q, g, ql, gl))
    return dict(case=f"mAP@all {'multi' if multi else 'single'}-label {n}^2 c{classes}", check_vs_cpu=ok,
                pair_both_directions_s=pair_sec,
                mAP=float(average_precision(q, g, ql, gl).mean()), sdml_s=sec, torch_vectorized_s=alt,
                ratio=alt / sec, sdml_GFLOPps=2 * n * n * 512 / sec / 1e9, sdml_peak_MB=peak, torch_peak_MB=alt_peak)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check_out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("retrieval GPU check: no CUDA device")
        return 1
    results = [check_topk(10000, 100000, 50), check_topk(10000, 100000, 1000),
               check_map(23661, 10, False), check_map(30137, 80, True)]
    for r in results:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "retrieval_gpu.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, indent=1))
    ok = all(r["check_vs_cpu"] for r in results)
    print(f"retrieval GPU check: {'OK' if ok else 'MISMATCH against the CPU op'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
