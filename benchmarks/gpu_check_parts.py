"""The training and kernel parts of the GPU check, run by benchmarks/gpu_check.sh one part per
process, so that a per-part time limit stops a hang without losing the other parts' results.

  python -P benchmarks/gpu_check_parts.py PART [PART ...] --work DIR     (PART: one of PARTS)
  python -P benchmarks/gpu_check_parts.py report --work DIR --out OUT

Every part writes {"status": "ok" | "failed" | "skipped", "summary": one line, ...numbers} to
DIR/part_PART.json and prints its summary (the dry run runs all parts in one process: it saves a
torch import and a CPU worker start-up per part); ``report`` merges the parts, the shell steps'
status (DIR/status.tsv) and the retrieval results into OUT/gpu_check.json and OUT/report.txt,
prints the report and checks OUT holds at most 8 files of at most 16 MiB.

Sizes are the paper's datasets' (XMedia widths, Wikipedia, NUS-WIDE and MS-COCO test sets). With SDML_GPU_CHECK_DRY=1 every part runs at tiny sizes (on the CPU where
there is no GPU), which exercises all of the logic but the CUDA timings; without it, a part that
needs CUDA says "skipped: no CUDA" on a machine without one. Timing: CUDA events (the host
clock on the CPU) around a synchronized call, warm-up first, median of the rounds (>= 3).

Expected H200 times (conservative guesses: no CUDA run has happened yet; each includes ~5 s of
Python/torch import and CUDA context start), against the per-part limits in gpu_check.sh:
  strategies ~15 s (4 CUDA runs of 3 epochs, one CPU run) · epoch ~10 s ·
  wiki200 ~50 s (5 runs of 200 epochs: 8,400 steps at ~1 ms of Python and kernel launches each, if
  launch-bound) · streams ~15 s. The kernel parts (loss, topk, map) are in gpu_check_kernels.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # helpers: the task builder

from helpers import tasks_for  # noqa: E402

DRY = os.environ.get("SDML_GPU_CHECK_DRY") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda:0" if CUDA else "cpu"
H200_BANDWIDTH = 4.8e12  # bytes/s of HBM3e (read + write): the floor the loss is measured against
MAX_OUT_FILES = 8
MAX_OUT_BYTES = 16 << 20
if DRY and not CUDA:
    torch.set_num_threads(1)  # tiny sizes: more threads only contend, the more so on a shared machine


class Skipped(Exception):
    pass


_partial_path: Path | None = None  # where the running part saves what it has so far


def save_partial(result: dict) -> None:
    """Saves a part's numbers so far: if its time limit kills it, the report still has them."""
    if _partial_path is not None:
        text = json.dumps({**result, "status": "incomplete", "dry_run": DRY}, indent=1, default=float)
        _partial_path.write_text(text)


def need_cuda() -> None:
    """Parts that only mean something on a GPU run tiny on the CPU in a dry run, else skip."""
    if not CUDA and not DRY:
        raise Skipped("no CUDA")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object]) -> float:
    """Seconds of one synchronized call: CUDA events on the GPU, the host clock on the CPU."""
    sync()
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], rounds: int = 3, warmup: int = 1) -> dict:
    """Median and all round times (s) of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [time_once(fn) for _ in range(rounds)]
    return {"median_s": statistics.median(times), "times_s": times}


def verdict(value: float, target: float, better: str) -> str:
    """'met' or how far a measured value misses its target (better: 'lower' or 'higher')."""
    met = value <= target if better == "lower" else value >= target
    if met:
        return "met"
    return f"misses by {value / target:.2f}x" if better == "lower" else f"misses by {target / value:.2f}x"


# ---- data and the plain PyTorch reference --------------------------------------------------------


def synthetic(dims, n_train, n_val=0, n_classes=10, seed=0):
    from sdml_ext.data import make_synthetic

    return make_synthetic(len(dims), dims=list(dims), n_train=n_train, n_val=n_val, n_test=0, n_classes=n_classes,
                          seed=seed)


def small_net() -> dict:
    """Network options of the dry run (the real run uses the paper's 1024-1024-512)."""
    return {"hidden": (32, 32), "code_dim": 16} if DRY else {}


class PlainDSAE(nn.Module):
    """The DSAE written as one would in plain PyTorch: D -> hidden -> code -> hidden reversed -> D,
    ReLU between layers, L2-normalized code and output (the authors' recipe). Its layout (and so
    its state_dict keys) matches sdml_ext.model.DSAE, so it can start from the same weights."""

    def __init__(self, D: int, hidden=(1024, 1024), code: int = 512):
        super().__init__()

        def mlp(widths):
            layers = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
            return nn.Sequential(*layers)

        self.encoder = mlp([D, *hidden, code])
        self.decoder = mlp([code, *reversed(hidden), D])

    def forward(self, x):
        h = F.normalize(self.encoder(x), dim=1)
        return h, F.normalize(self.decoder(h), dim=1)


def plain_epoch(model, optimizer, x, y, P, perm, batch: int, lam: float) -> torch.Tensor:
    """One epoch of the recipe in eager ops over the permutation `perm`; the mean batch loss."""
    from bench_dsae_loss import eager  # the loss in plain PyTorch ops, checked against the fused op there

    steps = x.shape[0] // batch
    total = torch.zeros((), device=x.device)
    for j in range(steps):
        idx = perm[j * batch : (j + 1) * batch]
        xb = x.index_select(0, idx)
        h, x_hat = model(xb)
        loss = eager(x_hat, xb, h, P, y.index_select(0, idx), lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return total / steps


def compare_models(reference, other) -> dict:
    """Tensor-for-tensor comparison of two runs' kept states (ModalityResult lists)."""
    bitwise, max_diff, close, diff2, norm2 = True, 0.0, True, 0.0, 0.0
    for a, b in zip(reference, other):
        for key, value in a.state.items():
            w = b.state[key]
            bitwise &= bool(np.array_equal(value, w))
            if value.size:
                max_diff = max(max_diff, float(np.abs(value.astype(np.float64) - w).max()))
            diff2 += float(np.sum((value.astype(np.float64) - w) ** 2))
            norm2 += float(np.sum(value.astype(np.float64) ** 2))
            close &= bool(np.allclose(w, value, rtol=1e-4, atol=1e-6))
        bitwise &= a.best_epoch == b.best_epoch
    # rel_l2: |other - reference| / |reference| over all tensors; tells rounding (~1e-7..1e-5)
    # from a different model (~1e-2 and up) where a few weights fail the elementwise test.
    return {"bitwise_equal": bitwise, "max_abs_diff": max_diff, "close_rtol1e-4_atol1e-6": close,
            "rel_l2": (diff2 / norm2) ** 0.5 if norm2 else 0.0}


def sameness(comparison: dict) -> str:
    """A compare_models result in words."""
    if comparison["bitwise_equal"]:
        return "bitwise equal"
    word = "close" if comparison["close_rtol1e-4_atol1e-6"] else "DIFFERENT"
    return f"{word}, max |diff| {comparison['max_abs_diff']:.1e}, relative L2 {comparison['rel_l2']:.1e}"


# ---- parts ----------------------------------------------------------------------------------------


def part_strategies() -> dict:
    """joint, serial, parallel (streams) and parallel over ["cuda:0", "cuda:0"] give the same models."""
    need_cuda()
    from sdml_ext.engine.strategies import train_tasks

    if DRY:
        ds = synthetic([40, 24, 8], [250, 150, 200], n_val=40, n_classes=5, seed=2)
        tasks = tasks_for(ds, hidden=(48, 48), code_dim=16, batch_size=50, epochs=2)
    else:  # different sizes, so the joint loop has modalities dropping out mid-epoch
        ds = synthetic([4096, 300, 29], [2173, 1500, 800], n_val=231, seed=2)
        tasks = tasks_for(ds, epochs=3)
    runs = {name: train_tasks(tasks, s, devices=[DEVICE], cores=2) for name, s in
            (("serial", "serial"), ("joint", "joint"), ("parallel", "parallel"))}
    notes = []
    if CUDA:
        # Two "devices" on a one-GPU host: the config refuses a device listed twice; train_tasks
        # takes it and puts every modality on cuda:0, one stream each, which is the layout of
        # parallel on ["cuda:0"]. Should train_tasks refuse it too, that is said, not failed.
        try:
            runs["parallel_cuda0_twice"] = train_tasks(tasks, "parallel", devices=["cuda:0", "cuda:0"])
            notes.append(f"cuda:0 twice -> assignment {runs['parallel_cuda0_twice'].plan.get('assignment')}")
        except ValueError as exc:
            notes.append(f"train_tasks refuses cuda:0 twice ({exc}); parallel on cuda:0 is one stream per modality")
    else:
        notes.append("parallel over cuda:0 twice: skipped: no CUDA")
    result = {"device": DEVICE, "wall_s": {k: r.wall_s for k, r in runs.items()}, "vs_serial": {}}
    for name, run in runs.items():
        if name != "serial":
            result["vs_serial"][name] = compare_models(runs["serial"].modalities, run.modalities)
    if CUDA:
        cpu = train_tasks(tasks, "serial", devices=["cpu"])
        # Different kernels and summation orders: the same trajectory, not the same bits.
        rel = max(abs(a.train_loss - b.train_loss) / max(abs(a.train_loss), 1e-12)
                  for ra, rb in zip(cpu.modalities, runs["serial"].modalities) for a, b in zip(ra.history, rb.history))
        result["cuda_vs_cpu_train_loss_max_rel_diff"] = rel
        notes.append(f"CUDA vs CPU training loss within {rel:.1e} (relative)")
    # Expected on CUDA: bitwise equal. Each modality runs the same kernels on the same shapes in
    # the same order whatever stream it is on; cuBLAS and the fused loss reduce in a fixed order
    # (the loss's only atomic adds an integer count). On the CPU, joint and serial are bitwise
    # equal (one process, one thread count); parallel's workers may get another thread count than
    # the serial loop, and so another BLAS blocking: ~1e-8 differences were seen in the dry run.
    # Should cuBLAS pick another algorithm per stream, rounding differences could likewise grow
    # over the steps: "close" (rtol 1e-4, atol 1e-6, as tests/test_train_strategies.py) is the
    # pass mark, "bitwise" is reported beside it.
    ok = all(v["close_rtol1e-4_atol1e-6"] for v in result["vs_serial"].values())
    kinds = ", ".join(f"{k}: {sameness(v)}" for k, v in result["vs_serial"].items())
    result["status"] = "ok" if ok else "failed"
    result["summary"] = f"models against serial's on {DEVICE}: {kinds}; " + "; ".join(notes)
    return result


def part_epoch() -> dict:
    """One epoch of a 4,096-d modality (2,173 rows, batch 100): sdml_ext's trainer on CUDA graphs
    and on eager steps against the plain PyTorch loop of the same recipe, all started from the
    same weights and permutations, timed interleaved."""
    need_cuda()
    from sdml_ext.engine.training import ModalityTrainer

    D, n, batch, rounds = (64, 230, 10, 3) if DRY else (4096, 2173, 100, 7)
    task = tasks_for(synthetic([D], n, seed=5), epochs=1000, batch_size=batch, **small_net())[0]
    # The graph path on the GPU; in a dry run on the CPU its steps run uncaptured (same logic).
    # "eager" is the autograd step the graphs capture (on the CPU the default step is the
    # explicit one, which bench_epoch.py times).
    trainers = {"graphs": ModalityTrainer(task, DEVICE, graphs=True),
                "eager": ModalityTrainer(task, DEVICE, graphs=False, explicit=False)}
    opts = task.options
    plain = PlainDSAE(D, opts.hidden, opts.code_dim).to(DEVICE)
    plain.load_state_dict(trainers["eager"].model.state_dict())
    optimizer = torch.optim.Adam(plain.parameters(), lr=trainers["eager"].lr, betas=opts.betas)
    shuffle = torch.Generator().manual_seed(trainers["eager"].seed)  # the trainers' permutations, drawn the same way
    x, y, P = trainers["eager"].train_x, trainers["eager"].train_y, trainers["eager"].loss.P

    def sdml(trainer):
        trainer.begin_epoch()
        for j in range(trainer.steps_per_epoch):
            trainer.step(j)
        return trainer.end_epoch().train_loss

    def reference():
        perm = torch.randperm(n, generator=shuffle).to(DEVICE)
        return float(plain_epoch(plain, optimizer, x, y, P, perm, batch, opts.lam))

    # Same recipe: from the same start, the first epoch's mean loss agrees (fused vs eager loss,
    # fused vs foreach Adam: rounding only); the graph path's is the eager path's.
    first = {"graphs": sdml(trainers["graphs"]), "eager": sdml(trainers["eager"]), "plain": reference()}
    rel = abs(first["eager"] - first["plain"]) / abs(first["plain"])
    rel_graphs = abs(first["graphs"] - first["eager"]) / abs(first["eager"])
    contenders = {"graphs": lambda: sdml(trainers["graphs"]), "eager": lambda: sdml(trainers["eager"]), "plain": reference}
    times = {k: [] for k in contenders}
    for _ in range(rounds):  # interleaved, so all see the same clocks and load
        for name, fn in contenders.items():
            times[name].append(time_once(fn))
        save_partial({"summary": f"epoch: rounds so far {times}", "times_s": times})
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio, eager_ratio = med["graphs"] / med["plain"], med["eager"] / med["plain"]
    ok = rel < 1e-3 and rel_graphs < 1e-4
    return {
        "status": "ok" if ok else "failed", "device": DEVICE, "D": D, "rows": n, "batch": batch,
        "first_epoch_loss": {**first, "rel_diff": rel, "graphs_vs_eager_rel_diff": rel_graphs},
        "epoch_s": med, "times_s": times, "sdml_over_plain": ratio, "eager_over_plain": eager_ratio,
        "summary": f"{D}-d epoch on {DEVICE}: graphs {1e3 * med['graphs']:.2f} ms, eager {1e3 * med['eager']:.2f} ms,"
                   f" plain PyTorch {1e3 * med['plain']:.2f} ms -> graphs {ratio:.2f}x plain (target <= 0.2x:"
                   f" {verdict(ratio, 0.2, 'lower')}), eager {eager_ratio:.2f}x; first-epoch loss"
                   f" {'agrees' if ok else 'DIFFERS'} (eager vs plain {rel:.1e}, graphs vs eager {rel_graphs:.1e} relative)",
    }


def part_graphs() -> dict:
    """Graphs give the eager path's models: a Wikipedia-shape pair of modalities (4,096-d and
    300-d, 2,173 rows, 231 validation rows), trained a few epochs each way from the same seed."""
    need_cuda()
    from sdml_ext.engine.training import ModalityTrainer

    if DRY:
        ds, epochs = synthetic([64, 30], 230, n_val=23, seed=8), 3
    else:
        ds, epochs = synthetic([4096, 300], 2173, n_val=231, seed=8), 10
    tasks = tasks_for(ds, epochs=epochs, **small_net())
    results, walls, captures = {}, {}, []
    for name, graphs in (("graphs", True), ("eager", False)):
        start = time.perf_counter()
        trainers = [ModalityTrainer(t, DEVICE, graphs=graphs, explicit=False) for t in tasks]  # the autograd step
        results[name] = [t.run() for t in trainers]
        sync()
        walls[name] = time.perf_counter() - start
        if graphs:
            captures = [t._graph.captures for t in trainers]
    same = compare_models(results["eager"], results["graphs"])
    histories = max(abs(a.train_loss - b.train_loss) / max(abs(a.train_loss), 1e-12)
                    for ra, rb in zip(results["eager"], results["graphs"]) for a, b in zip(ra.history, rb.history))
    ok = same["close_rtol1e-4_atol1e-6"] and captures == [1] * len(tasks)
    return {
        "status": "ok" if ok else "failed", "device": DEVICE, "epochs": epochs, "wall_s": walls,
        "graphs_vs_eager_models": same, "train_loss_max_rel_diff": histories, "captures": captures,
        "summary": f"{' + '.join(f'{m.dim}-d' for m in ds)}, {epochs} epochs on {DEVICE}: graphs {walls['graphs']:.2f} s,"
                   f" eager {walls['eager']:.2f} s; models: {sameness(same)} (target: same models within float"
                   f" tolerance: {'met' if same['close_rtol1e-4_atol1e-6'] else 'MISSED'}); training losses within"
                   f" {histories:.1e}; graphs captured {captures} time(s)",
    }


def part_streams() -> dict:
    """Five modalities of XMedia-like widths: parallel on streams against serial (and joint)."""
    need_cuda()
    from sdml_ext.engine.strategies import train_tasks

    widths, n, rounds = ((64, 30, 29, 70, 64), 120, 1) if DRY else ((4096, 300, 29, 4700, 4096), 2173, 3)
    batch = 10 if DRY else 100
    # 30 epochs: each run's start (data upload, graph capture) stays a small part of its time.
    tasks = tasks_for(synthetic(widths, n, seed=6), epochs=2 if DRY else 30, batch_size=batch, **small_net())
    order = ["serial", "parallel"] + ([] if DRY else ["joint"])  # dry: CPU worker start-up is slow enough
    if not DRY:
        train_tasks(tasks[:1], "serial", devices=[DEVICE])  # warm-up: cuBLAS handles, allocator
    walls = {s: [] for s in order}
    runs = {}
    for r in range(rounds):
        for s in order[r % len(order):] + order[: r % len(order)]:
            runs[s] = train_tasks(tasks, s, devices=[DEVICE], cores=2)
            walls[s].append(runs[s].wall_s)
            save_partial({"summary": f"streams: finished runs {walls}", "times_s": walls})
    med = {s: statistics.median(v) for s, v in walls.items()}
    same = compare_models(runs["serial"].modalities, runs["parallel"].modalities)
    speedup = med["serial"] / med["parallel"]
    return {
        "status": "ok" if same["close_rtol1e-4_atol1e-6"] else "failed", "device": DEVICE, "widths": list(widths),
        "rows": n, "epochs": tasks[0].options.epochs, "wall_s": med, "times_s": walls,
        "serial_over_parallel": speedup, "parallel_vs_serial_models": same,
        "summary": f"{len(widths)} modalities x {tasks[0].options.epochs} epochs on {DEVICE}: serial"
                   f" {med['serial']:.2f} s, parallel {med['parallel']:.2f} s ({speedup:.2f}x; target >= 3x:"
                   f" {verdict(speedup, 3.0, 'higher')})"
                   + (f", joint {med['joint']:.2f} s" if "joint" in med else "")
                   + f"; parallel's models against serial's: {sameness(same)}",
    }


def part_wiki200() -> dict:
    """200 epochs of a Wikipedia-size run (4,096-d + 300-d, 2,173 rows, 231 validation rows)."""
    need_cuda()
    from sdml_ext.engine.strategies import train_tasks

    if DRY:
        ds, epochs = synthetic([64, 30], 230, n_val=23, seed=7), 3
    else:
        ds, epochs = synthetic([4096, 300], 2173, n_val=231, seed=7), 200
    tasks = tasks_for(ds, epochs=epochs, **small_net())
    if not DRY:  # warm-up: cuBLAS handles, the allocator's pool
        train_tasks(tasks_for(ds, epochs=1, **small_net()), "parallel", devices=[DEVICE])
    # dry: serial and joint only (parallel's CPU workers are exercised by the strategies part)
    plan = (("serial", 1), ("joint", 1)) if DRY else (("parallel", 3), ("serial", 1), ("joint", 1))
    walls = {s: [] for s, _ in plan}
    for s, rounds in plan:
        for _ in range(rounds):
            walls[s].append(train_tasks(tasks, s, devices=[DEVICE], cores=2).wall_s)
            save_partial({"summary": f"{epochs} epochs: finished runs {walls}", "times_s": walls})
    med = {s: statistics.median(v) for s, v in walls.items()}
    best = min(med, key=med.get)
    return {
        "status": "ok", "device": DEVICE, "epochs": epochs, "wall_s": med, "times_s": walls,
        "summary": f"{epochs} epochs of {' + '.join(f'{m.dim}-d' for m in ds)}, {ds[ds.modality_names[0]].train.n} rows,"
                   f" on {DEVICE}: " + ", ".join(f"{s} {v:.2f} s" for s, v in med.items())
                   + (f" (target <= 2 s: {verdict(med[best], 2.0, 'lower')} by {best}; the paper's 1080 Ti: 31.9 s)"
                      if not DRY else " (dry run: tiny sizes)"),
    }


PARTS = {"strategies": part_strategies, "epoch": part_epoch, "wiki200": part_wiki200, "streams": part_streams,
         "graphs": part_graphs}
# The kernel parts (benchmarks/gpu_check_kernels.py: the fused loss, top-k, mAP), in the report too.
KERNEL_PART_NAMES = ("loss", "topk", "map")
REPORT_PARTS = (*PARTS, *KERNEL_PART_NAMES)


def run_part(name: str, path: Path, parts: dict | None = None) -> int:
    """Runs one part (of `parts`, default PARTS), writes its result to `path` and prints its
    summary; 1 if it failed."""
    global _partial_path
    _partial_path = path
    start = time.perf_counter()
    try:
        result = (parts or PARTS)[name]()
    except Skipped as why:
        result = {"status": "skipped", "summary": f"skipped: {why}"}
    except Exception as exc:  # reported, and the next part still runs
        result = {"status": "failed", "summary": f"failed: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(result["traceback"], file=sys.stderr)
    result["elapsed_s"] = time.perf_counter() - start
    result["dry_run"] = DRY
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"{name}: {result['summary']}")
    return 1 if result["status"] == "failed" else 0


# ---- the report --------------------------------------------------------------------------------------


def pytest_summary(log: Path) -> str | None:
    """The last "N passed, M skipped in Xs" line of a pytest log."""
    if not log.exists():
        return None
    lines = [ln.strip(" =") for ln in log.read_text(errors="replace").splitlines() if " in " in ln and
             any(w in ln for w in ("passed", "failed", "error", "skipped", "deselected"))]
    return lines[-1] if lines else None


def memcheck_summary(log: Path) -> str | None:
    """compute-sanitizer's error summaries and the pytest results of the memcheck step."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace").splitlines()
    errors = [ln.split("ERROR SUMMARY:")[1].strip() for ln in text if "ERROR SUMMARY:" in ln]
    tests = [ln.strip(" =") for ln in text if " in " in ln and any(w in ln for w in ("passed", "failed", "error"))]
    parts = [f"memcheck {', '.join(errors)}"] if errors else []
    return "; ".join(parts + tests) or None


def report(work: Path, out: Path) -> int:
    """Merges everything into OUT/gpu_check.json and OUT/report.txt; 1 if anything failed."""
    steps = {}
    for line in (work / "status.tsv").read_text().splitlines():
        name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
        steps[name] = {"rc": rc, "seconds": float(seconds or 0), "limit_s": limit, "note": note}
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if CUDA else "no CUDA", "dry_run": DRY, "steps": steps, "parts": {}}
    for name, file in (("nvidia_smi", "device.txt"), ("build_info", "build_info.json")):
        if (work / file).exists():
            text = (work / file).read_text().strip()
            data[name] = json.loads(text) if file.endswith(".json") and text else text
    lines = [f"GPU check {data['date']}: {data['device']}, torch {data['torch']}" + (" (DRY RUN, tiny sizes)" if DRY else "")]
    if "build_info" in data:
        lines.append(f"installed sdml_ext: {data['build_info']}")
    failed = []
    part_lines = []
    for name in REPORT_PARTS:
        file = work / f"part_{name}.json"
        # The dry run has one step for all parts of each script.
        step = steps.get(name, steps.get("parts" if name in PARTS else "kernels"))
        if file.exists():
            part = json.loads(file.read_text())
            if part["status"] == "incomplete":  # killed by its time limit after saving some numbers
                part["status"] = "failed"
                part["summary"] = f"incomplete (rc {step['rc'] if step else '?'}): {part['summary']}"
        elif step is None or step["rc"] == "skipped":
            part = {"status": "skipped", "summary": f"skipped: {step['note'] if step else 'not run'}"}
        else:
            rc = step["rc"]
            part = {"status": "failed", "summary": f"no result (rc {rc}: {'timed out' if rc in ('124', '137') else 'crashed'})"}
        data["parts"][name] = part
        part_lines.append(f"{name}: {part['summary']} [{part.get('elapsed_s', 0):.0f} s]")
        if part["status"] == "failed":
            failed.append(name)
    for name, step in steps.items():
        rc, note = step["rc"], step["note"]
        if name in REPORT_PARTS or name in ("parts", "kernels"):
            lines += part_lines  # in the place the parts ran
            part_lines = []
            continue
        if name.startswith("tests"):
            note = pytest_summary(work / f"{name}.log") or note
        elif name == "memcheck":
            note = memcheck_summary(work / "tests_memcheck.log") or note
        elif name == "retrieval" and (work / "retrieval" / "retrieval_gpu.json").exists():
            data["retrieval"] = json.loads((work / "retrieval" / "retrieval_gpu.json").read_text())
            try:
                note = "; ".join(f"{r['case']}: sdml {r['sdml_s']:.3f} s, {r['ratio']:.2f}x the torch alternative"
                                 f"{'' if r['check_vs_cpu'] else ' MISMATCH'}" for r in data["retrieval"]["results"])
            except (KeyError, TypeError, ValueError):  # gpu_check_retrieval.py changed its fields
                note = "results in gpu_check.json"
        state = "skipped" if rc == "skipped" else ("ok" if rc == "0" else f"FAILED (rc {rc}"
                                                   f"{', timed out' if rc in ('124', '137') else ''})")
        if state.startswith("FAILED"):
            failed.append(name)
        lines.append(f"{name}: {state}{': ' + note if note else ''} [{step['seconds']:.0f} s]")
    lines += part_lines  # none ran (the build failed)
    data["failed"] = failed
    lines.append(f"GPU CHECK: {'OK' if not failed else 'FAILED: ' + ', '.join(failed)}")
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=float))
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    files = [p for p in out.rglob("*") if p.is_file()]
    big = [p.name for p in files if p.stat().st_size > MAX_OUT_BYTES]
    if len(files) > MAX_OUT_FILES or big:
        lines.append(f"OUT LIMITS BROKEN: {len(files)} files (at most {MAX_OUT_FILES}), over 16 MiB: {big}")
        failed.append("out-limits")
    print("\n".join(lines))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="+", choices=[*PARTS, "report"])
    parser.add_argument("--work", type=Path, required=True, help="the run's scratch folder (status.tsv, part_*.json)")
    parser.add_argument("--out", type=Path, help="report: the folder that comes back ($OUT)")
    args = parser.parse_args()
    if "report" in args.part:
        if args.part != ["report"] or not args.out:
            parser.error("report goes alone and needs --out")
        return report(args.work, args.out)
    return max([run_part(name, args.work / f"part_{name}.json") for name in args.part])


if __name__ == "__main__":
    sys.exit(main())
