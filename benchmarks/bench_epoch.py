"""One training epoch on the CPU: sdml_ext's trainer against a plain PyTorch loop of the same recipe.

  .venv/bin/python -P benchmarks/bench_epoch.py [--rounds 5] [--rows 2173] [--dim 4096] [--profile]

The modality: ``rows`` x ``dim`` synthetic features (10 classes), batch 100, the paper's network
(D -> 1024 -> 1024 -> 512 -> 1024 -> 1024 -> D), Adam. The trainer takes the CPU's explicit step
(sdml_ext.engine.explicit_step: no autograd, Adam fused into the weight-gradient GEMMs); the plain
loop (``plain_epoch`` of gpu_check_parts.py: eager loss, foreach Adam, index_select batches) starts
from the trainer's weights and draws the same permutations. Before timing, the two must be the
same algorithm: one step of each from the same weights on the same batch leaves the weights within
1e-3 of how far the step moved them (they differ by rounding only: ~1e-5), and one epoch of each
from the same start gives the same mean loss (to 1e-4) and weights within 5 % of how far they moved
(training amplifies rounding: the trainer's own weights after one epoch on 1 and on 2 threads are
~3.5 % apart). Then rounds alternate the
two (order rotated), and the median epoch times are reported as a ratio (target <= 0.5), beside
the one-minute load, the fp32 GEMM rate, the copy bandwidth and the epoch's GEMM floor (its
multiply-adds at the measured GEMM rate). ``--profile`` prints torch.profiler's table of one
epoch of each.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import load_note, measured_copy_bandwidth, measured_gemm_rate  # noqa: E402
from gpu_check_parts import PlainDSAE, plain_epoch, synthetic, tasks_for  # noqa: E402
from sdml_ext.engine.training import ModalityTrainer  # noqa: E402


def epoch_flops(dim: int, hidden, code: int, rows: int, batch: int) -> float:
    """Multiply-add FLOPs of an epoch's GEMMs: forward, input gradients (not of the first layer) and weight gradients."""
    widths = [dim, *hidden, code, *reversed(hidden), dim]
    layers = list(zip(widths[:-1], widths[1:]))
    per_sample = sum(2 * a * b for a, b in layers) * 3 - 2 * layers[0][0] * layers[0][1]
    return per_sample * (rows // batch) * batch


def build(rows: int, dim: int, batch: int):
    task = tasks_for(synthetic([dim], rows, seed=5), epochs=10**6, batch_size=batch)[0]
    trainer = ModalityTrainer(task, "cpu")
    opts = task.options
    plain = PlainDSAE(dim, opts.hidden, opts.code_dim)
    plain.load_state_dict(trainer.model.state_dict())
    optimizer = torch.optim.Adam(plain.parameters(), lr=trainer.lr, betas=opts.betas)
    shuffle = torch.Generator().manual_seed(trainer.seed)  # the trainer's permutations, drawn the same way
    x, y, P = trainer.train_x, trainer.train_y, trainer.loss.P

    def sdml():
        trainer.begin_epoch()
        for j in range(trainer.steps_per_epoch):
            trainer.step(j)
        return trainer.end_epoch().train_loss

    def reference():
        perm = torch.randperm(rows, generator=shuffle)
        return float(plain_epoch(plain, optimizer, x, y, P, perm, batch, opts.lam))

    return trainer, plain, sdml, reference


def _apart(ours: dict, theirs: dict, start: dict) -> float:
    """How far apart two weight sets are, as a fraction of how far `theirs` moved from `start`:
    Adam turns rounding-level differences of tiny gradients into whole-step differences of single
    weights, so elementwise bounds say little."""
    moved = sum(float((theirs[k] - start[k]).double().square().sum()) for k in theirs) ** 0.5
    apart = sum(float((ours[k] - theirs[k]).double().square().sum()) for k in ours) ** 0.5
    return apart / moved


def check_one_step(rows: int, dim: int, batch: int) -> float:
    """From the same weights, one step of each loop on the trainer's first batch: the weights
    apart as a fraction of the step (rounding only)."""
    trainer, plain, _, _ = build(rows, dim, batch)
    start = copy.deepcopy(plain.state_dict())
    first = torch.Generator()
    first.set_state(trainer.shuffle.get_state())
    idx = torch.randperm(rows, generator=first)[:batch]  # the trainer's first batch
    trainer.begin_epoch()
    trainer.step(0)
    opts = trainer.task.options
    optimizer = torch.optim.Adam(plain.parameters(), lr=trainer.lr, betas=opts.betas)  # as build()'s, unused
    plain_epoch(plain, optimizer, trainer.train_x[idx], trainer.train_y[idx], trainer.loss.P, torch.arange(batch),
                batch, opts.lam)
    return _apart(trainer.model.state_dict(), plain.state_dict(), start)


def check_same_recipe(trainer, plain, sdml, reference) -> dict:
    """One step, then one epoch of each from the same weights: the step's weights to rounding,
    the epoch's mean loss and weights as the module's docstring says."""
    rows, dim = trainer.train_x.shape
    step_rel = check_one_step(rows, dim, trainer.task.options.batch_size)
    start = copy.deepcopy(plain.state_dict())
    loss = sdml(), reference()
    rel = abs(loss[0] - loss[1]) / abs(loss[1])
    weight_rel = _apart(trainer.model.state_dict(), plain.state_dict(), start)
    if step_rel > 1e-3 or rel > 1e-4 or weight_rel > 5e-2:
        raise SystemExit(f"bench_epoch: the two loops disagree (one step: weights apart {step_rel:.1e} of the "
                         f"step; one epoch: loss rel diff {rel:.1e}, weights apart {weight_rel:.1e} of their update)")
    return {"first_epoch_loss": loss, "loss_rel_diff": rel, "weight_rel_diff": weight_rel, "step_rel_diff": step_rel}


def profile(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"--- {label}: torch.profiler, one epoch ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2173)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (a median of fewer is not a measurement)")

    trainer, plain, sdml, reference = build(args.rows, args.dim, args.batch)
    agreement = check_same_recipe(trainer, plain, sdml, reference)
    if args.profile:
        profile(sdml, "sdml_ext trainer")
        profile(reference, "plain PyTorch loop")
    gemm = measured_gemm_rate()
    copy_bw = measured_copy_bandwidth()
    opts = trainer.task.options
    floor = epoch_flops(args.dim, opts.hidden, opts.code_dim, args.rows, args.batch) / gemm
    times = {"sdml": [], "plain": []}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        order = [("sdml", sdml), ("plain", reference)]
        for name, fn in order[r % 2 :] + order[: r % 2]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["sdml"] / med["plain"]
    print(f"machine: {load_note()}, threads {torch.get_num_threads()}, fp32 GEMM {gemm / 1e9:.0f} GFLOP/s, "
          f"copy {copy_bw / 1e9:.1f} GB/s; load1 per round {[round(v, 2) for v in loads]}")
    print(f"agreement: one step, weights apart {agreement['step_rel_diff']:.1e} of the step; one epoch, loss rel "
          f"diff {agreement['loss_rel_diff']:.1e}, weights apart {agreement['weight_rel_diff']:.1e} of their update")
    print(f"epoch {args.rows} x {args.dim}, batch {args.batch}: sdml {med['sdml']:.3f} s, plain {med['plain']:.3f} s "
          f"-> {ratio:.2f}x (target <= 0.5x); GEMM floor {floor:.3f} s (sdml at {med['sdml'] / floor:.2f}x it)")
    print("rounds (s):", {k: [round(t, 3) for t in v] for k, v in times.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
