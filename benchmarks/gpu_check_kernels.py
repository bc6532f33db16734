"""The kernel parts of the GPU check, run by benchmarks/gpu_check.sh one part per process (as
gpu_check_parts.py, whose helpers, result files and report they share):

  python -P benchmarks/gpu_check_kernels.py PART [PART ...] --work DIR     (PART: loss, topk, map, profile)

Each part checks its kernel's results first, then times it against the alternatives in the same
process (CUDA events, warm-up first, median of >= 3 rounds) and against its floor, and states each
target of the kernel work as met or missed by how much:
  loss  fused loss forward + backward at B = 4,096 and at the training batch B = 100 (D = 4,096):
        against eager PyTorch, torch.compile of the same expression and the bandwidth floor (the bytes
        it must move at 4.8 TB/s). Targets: <= 1.5x the floor and >= 3x compile at B = 4,096; no
        slower than compile at B = 100.
  topk  cosine_topk 10,000 x 1,000,000, d = 512, k = 10 / 50 / 1,000 in every precision mode, against
        torch mm + topk in 2,000-query chunks; the floors are the GEMM at the H200's fp32 CUDA-core
        and bf16 tensor-core rates. Targets: exact <= 0.16 s (>= 2x torch), tf32/bf16 <= 0.05 s
        (>= 6x torch); one query x 1M no slower than torch; the fast modes' ids equal the exact
        mode's; the peak memory bounded by the tile.
  map   mAP@all at 23,661^2 single-label (10 classes) and 30,137^2 multi-label (80 classes), d = 512,
        against the sort-based torch evaluation and the similarity GEMM alone. Targets: <= 1.5x its
        GEMM (single-label), <= 2x (multi-label).
  profile  a short run of the top-k and mAP kernels for `ncu` (gpu_check.sh's ncu step wraps it).
With SDML_GPU_CHECK_DRY=1 every part runs at tiny sizes (on the CPU where there is no GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_check_parts import CUDA, DEVICE, DRY, H200_BANDWIDTH, need_cuda, run_part, save_partial, sync, timed, verdict  # noqa: E402

H200_FP32 = 67e12  # FLOP/s, CUDA cores (datasheet): the exact mode's GEMM floor
H200_BF16 = 990e12  # FLOP/s, dense bf16 tensor cores (datasheet): the fast modes' floor


def _ms(t: dict) -> str:
    return f"{1e3 * t['median_s']:.3f} ms"


def part_loss() -> dict:
    """Fused loss forward + backward against eager, torch.compile and the bandwidth floor."""
    need_cuda()
    from bench_dsae_loss import eager, floor_seconds, fused, fwd_bwd, make_case

    shapes = [(64, 256, 16, 10), (10, 256, 16, 10)] if DRY else [(4096, 4096, 512, 10), (100, 4096, 512, 10)]
    # Device copy bandwidth, measured: bytes read + written per second of a 1 GiB copy.
    src = torch.ones((1 << 28) if not DRY else (1 << 20), device=DEVICE)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), rounds=5, warmup=2)["median_s"]
    del src, dst
    # torch.compile of the same expression (the dry run skips it: a CPU compile is slow and says nothing).
    compiled = None if DRY else torch.compile(eager)
    cases, ok = [], True
    for B, D, d, c in shapes:
        inputs = make_case(B, D, d, c, DEVICE)
        want, got = fwd_bwd(eager, *inputs), fwd_bwd(fused, *inputs)
        match = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, want))
        ok = ok and match
        rounds = 3 if DRY else 25
        fns = {"fused": fused, "eager": eager, **({"compile": compiled} if compiled else {})}
        t = {name: timed(lambda fn=fn: fwd_bwd(fn, *inputs), rounds=rounds, warmup=3) for name, fn in fns.items()}
        floor = floor_seconds(inputs, H200_BANDWIDTH)
        case = {"shape": [B, D, d, c], "matches_eager": match, **t, "floor_s_at_4.8TBps": floor,
                "floor_s_at_measured": floor_seconds(inputs, bandwidth),
                "fused_over_floor": t["fused"]["median_s"] / floor,
                "compile_over_fused": t["compile"]["median_s"] / t["fused"]["median_s"] if compiled else None}
        cases.append(case)
        save_partial({"summary": f"loss: {len(cases)} of {len(shapes)} shapes", "cases": cases})
    big, small = cases
    lines = []
    for case, targets in ((big, "floor <= 1.5x, compile >= 3x"), (small, "compile >= 1x")):
        B = case["shape"][0]
        text = f"B{B}: fused {_ms(case['fused'])}, eager {_ms(case['eager'])}"
        if case["compile_over_fused"] is not None:
            text += f", compile {_ms(case['compile'])} ({case['compile_over_fused']:.2f}x"
            text += f": {verdict(case['compile_over_fused'], 3.0 if case is big else 1.0, 'higher')})"
        text += f", floor {1e3 * case['floor_s_at_4.8TBps']:.3f} ms -> {case['fused_over_floor']:.2f}x"
        if case is big:
            text += f" ({verdict(case['fused_over_floor'], 1.5, 'lower')})"
        lines.append(text)
    return {
        "status": "ok" if ok else "failed", "device": DEVICE, "cases": cases, "measured_copy_Bps": bandwidth,
        "matches_eager": ok, "fused_over_floor": big["fused_over_floor"],
        "summary": f"loss fwd+bwd D{big['shape'][1]} on {DEVICE}: " + "; ".join(lines)
                   + f"; copy {bandwidth / 1e12:.2f} TB/s" + ("" if ok else "; MISMATCH against eager"),
    }


def part_topk() -> dict:
    """cosine_topk in every precision against torch mm + topk, its GEMM floors and itself."""
    need_cuda()
    from bench_retrieval import torch_topk
    from sdml_ext.ops import cosine_topk

    nq, ng, d, ks = (200, 5000, 64, (5, 50)) if DRY else (10_000, 1_000_000, 512, (10, 50, 1000))
    precisions = ("exact", "tf32", "bf16") if CUDA else ("exact",)  # CPU: exact only
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(nq, d, device=DEVICE, generator=gen)
    g = torch.randn(ng, d, device=DEVICE, generator=gen)
    g_cpu, q_cpu = g.cpu(), q[:16].cpu()
    flop = 2 * nq * ng * d
    cases = []
    for k in ks:
        exact = cosine_topk(q[:256], g, k)
        cpu = cosine_topk(q_cpu, g_cpu, k)
        check = bool(torch.allclose(exact.scores[:16].cpu(), cpu.scores, rtol=0, atol=1e-5))
        same_as_cpu = float((exact.indices[:16].cpu() == cpu.indices).float().mean())
        case = {"k": k, "check_vs_cpu": check, "same_indices_as_cpu": same_as_cpu, "torch_mm_topk": timed(lambda: torch_topk(q, g, k))}
        for precision in precisions:
            fast = cosine_topk(q[:256], g, k, precision=precision)
            case[f"{precision}_ids_equal_exact"] = bool(torch.equal(fast.indices, exact.indices))
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            case[precision] = timed(lambda p=precision: cosine_topk(q, g, k, precision=p))
            case[precision]["peak_MiB_with_inputs"] = torch.cuda.max_memory_allocated() / 2**20 if CUDA else None
            case[precision]["torch_over_sdml"] = case["torch_mm_topk"]["median_s"] / case[precision]["median_s"]
            case[precision]["TFLOPps"] = flop / case[precision]["median_s"] / 1e12
        cases.append(case)
        save_partial({"summary": f"top-k: only k in {[c['k'] for c in cases]} finished", "cases": cases})
    one = {"sdml": timed(lambda: cosine_topk(q[:1], g, 10)), "torch": timed(lambda: torch_topk(q[:1], g, 10))}
    one["torch_over_sdml"] = one["torch"]["median_s"] / one["sdml"]["median_s"]
    ok = all(c["check_vs_cpu"] and all(c[f"{p}_ids_equal_exact"] for p in precisions) for c in cases)
    floor32, floor16 = flop / H200_FP32, flop / H200_BF16

    def line(c):
        parts = [f"k={c['k']} torch {c['torch_mm_topk']['median_s']:.3f} s"]
        for p in precisions:
            target = 2.0 if p == "exact" else 6.0
            parts.append(f"{p} {c[p]['median_s']:.3f} s = {c[p]['torch_over_sdml']:.2f}x torch "
                         f"(>= {target:g}x: {verdict(c[p]['torch_over_sdml'], target, 'higher')})")
        return ", ".join(parts)

    return {
        "status": "ok" if ok else "failed", "device": DEVICE, "nq": nq, "ng": ng, "d": d, "cases": cases,
        "one_query": one, "floor_fp32_s": floor32, "floor_bf16_s": floor16,
        "summary": f"top-k {nq}x{ng} d{d} on {DEVICE} (floors: fp32 {floor32:.3f} s, bf16 {floor16:.4f} s): "
                   + "; ".join(line(c) for c in cases)
                   + f"; one query {1e3 * one['sdml']['median_s']:.2f} ms vs torch {1e3 * one['torch']['median_s']:.2f} ms "
                     f"({verdict(one['torch_over_sdml'], 1.0, 'higher')})"
                   + ("" if ok else "; MISMATCH (vs the CPU op or between modes)"),
    }


def part_map() -> dict:
    """mAP@all against the sort-based torch evaluation and the similarity GEMM alone."""
    need_cuda()
    from bench_retrieval import embeddings, torch_map
    from sdml_ext.ops import average_precision

    sizes = [(300, 10, False), (400, 80, True)] if DRY else [(23_661, 10, False), (30_137, 80, True)]
    cases, ok = [], True
    for n, classes, multi in sizes:
        q, ql = embeddings(n, 512 if not DRY else 32, 0, DEVICE, classes, multi)
        g, gl = embeddings(n, 512 if not DRY else 32, 1, DEVICE, classes, multi)
        ours = average_precision(q[:64], g, ql[:64], gl)
        cpu = average_precision(q[:64].cpu(), g.cpu(), ql[:64].cpu(), gl.cpu())
        check = float((ours.cpu() - cpu).abs().max()) < 1e-3  # float32 GEMMs may swap near-ties
        ok = ok and check
        qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
        gemm = timed(lambda: qn @ gn.T)
        t = timed(lambda: average_precision(q, g, ql, gl))
        alt = timed(lambda: torch_map(q, g, ql, gl))
        target = 2.0 if multi else 1.5
        case = {"case": f"{'multi' if multi else 'single'}-label {n}^2 c{classes}", "check_vs_cpu": check, "sdml": t,
                "torch_sort": alt, "gemm": gemm, "over_gemm": t["median_s"] / gemm["median_s"],
                "torch_over_sdml": alt["median_s"] / t["median_s"], "target_over_gemm": target,
                "mAP": float(average_precision(q, g, ql, gl).mean())}
        cases.append(case)
        save_partial({"summary": f"mAP: {len(cases)} of {len(sizes)} cases", "cases": cases})
    return {
        "status": "ok" if ok else "failed", "device": DEVICE, "cases": cases,
        "summary": "mAP@all on " + DEVICE + ": " + "; ".join(
            f"{c['case']}: sdml {1e3 * c['sdml']['median_s']:.1f} ms = {c['over_gemm']:.2f}x its GEMM "
            f"(<= {c['target_over_gemm']:g}x: {verdict(c['over_gemm'], c['target_over_gemm'], 'lower')}), "
            f"{c['torch_over_sdml']:.2f}x faster than sort-based torch" for c in cases)
                   + ("" if ok else "; MISMATCH against the CPU op"),
    }


def part_profile() -> dict:
    """A short run for `ncu`: each selection / mAP kernel a few times at full width."""
    need_cuda()
    from bench_retrieval import embeddings
    from sdml_ext.ops import average_precision, cosine_topk

    nq, ng, d = (50, 5000, 32) if DRY else (2000, 1_000_000, 512)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(nq, d, device=DEVICE, generator=gen)
    g = torch.randn(ng, d, device=DEVICE, generator=gen)
    for precision in ("exact", "bf16") if CUDA else ("exact",):
        cosine_topk(q, g, 50, precision=precision)
    n = 500 if DRY else 23_661
    a, al = embeddings(n, 32 if DRY else 512, 0, DEVICE, 10, False)
    b, bl = embeddings(n, 32 if DRY else 512, 1, DEVICE, 10, False)
    average_precision(a, b, al, bl)
    sync()
    return {"status": "ok", "summary": f"profile run: top-k {nq}x{ng} (exact, bf16), mAP {n}^2"}


KERNEL_PARTS = {"loss": part_loss, "topk": part_topk, "map": part_map, "profile": part_profile}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="+", choices=list(KERNEL_PARTS))
    parser.add_argument("--work", type=Path, required=True, help="the run's scratch folder (part_*.json)")
    args = parser.parse_args()
    return max(run_part(name, args.work / f"part_{name}.json", KERNEL_PARTS) for name in args.part)


if __name__ == "__main__":
    sys.exit(main())
