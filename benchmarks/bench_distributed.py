"""The default run (embedded digits, 6 modalities, 40 epochs) three ways: torchrun with 2 ranks,
the parallel strategy, the serial strategy; and what checkpoints cost.

Run: .venv/bin/python benchmarks/bench_distributed.py [--rounds 1] [--epochs 40]

Each run is the full command (`python -m sdml_ext.train`, or torchrun of it) in a fresh process,
timed from start to exit (start-up, training, bundle, evaluation); the modes are interleaved and
rotated each round, and the machine's load is printed with every run. Checkpoint overhead: the
parallel run with the default cadence (every 60 s and at each modality's end) against the same
run with only the end-of-modality checkpoints (SDML_CHECKPOINT_EVERY=1e9), plus the measured cost
of one checkpoint of a digits modality times the number of checkpoints the default cadence takes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load_note  # noqa: E402

TRAIN = [sys.executable, "-m", "sdml_ext.train"]
MODES = {
    "distributed-2": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "-m", "sdml_ext.train"], {}),
    "parallel": (TRAIN + ["--strategy", "parallel"], {}),
    "serial": (TRAIN + ["--strategy", "serial"], {}),
    "parallel-final-checkpoints-only": (TRAIN + ["--strategy", "parallel"], {"SDML_CHECKPOINT_EVERY": "1e9"}),
}


def one_checkpoint_s(repeats: int = 5) -> float:
    """Median seconds of one checkpoint of the widest digits modality after one epoch."""
    from sdml_ext.engine.checkpoint import Checkpoints
    from sdml_ext.data import load_dataset
    from sdml_ext.model import make_projection
    from sdml_ext.engine.training import ModalityTrainer, TrainOptions, make_tasks

    ds = load_dataset("mfeat")
    m = max(ds, key=lambda m: m.dim)
    opts = TrainOptions(epochs=1)
    P = make_projection(opts.code_dim, ds.num_classes, opts.seed)
    task = make_tasks([m], P, opts)[0]
    trainer = ModalityTrainer(task)
    trainer.run()
    with tempfile.TemporaryDirectory() as d:
        checkpoints = Checkpoints(d)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            checkpoints.save(trainer)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    modes = args.modes.split(",")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for mode in order:
                argv, env = MODES[mode]
                out = Path(work) / f"{mode}-{r}"
                note = load_note()
                start = time.perf_counter()
                proc = subprocess.run([*argv, "--epochs", str(args.epochs), "--out", str(out)], capture_output=True,
                                      text=True, env={**os.environ, **env})
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
                walls[mode].append(wall)
                print(f"round {r} {mode:>32}: {wall:6.1f} s ({note} before)", flush=True)
    print(f"\nmfeat, {args.epochs} epochs, median of {args.rounds} rounds (whole command, start to exit):")
    median = {m: statistics.median(w) for m, w in walls.items()}
    for m in modes:
        print(f"  {m:>32}: {median[m]:6.1f} s")
    cost = one_checkpoint_s()
    print(f"\none checkpoint of the widest digits modality: {cost * 1000:.0f} ms")
    if "parallel" in median:
        from sdml_ext.engine.checkpoint import DEFAULT_EVERY_S

        # At most one periodic checkpoint per cadence of each worker's training, plus one at the
        # end of each of the 6 modalities.
        periodic = median["parallel"] / DEFAULT_EVERY_S * 2  # two workers train at once
        estimate = (periodic + 6) * cost / median["parallel"]
        print(f"default cadence on the parallel run: <= {periodic + 6:.0f} checkpoints, "
              f"~{estimate * 100:.1f}% of its wall time (CPU-side; the workers write their own)")
    if "parallel" in median and "parallel-final-checkpoints-only" in median:
        ratio = median["parallel"] / median["parallel-final-checkpoints-only"]
        print(f"parallel, default cadence / end-of-modality checkpoints only: {ratio:.3f}")


if __name__ == "__main__":
    main()
