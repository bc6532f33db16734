"""SDML-1/2/3 (joint / serial / parallel) on the same tasks: wall time and peak memory (the
paper's Tables 6 and 7), plus per-modality times.

Run: .venv/bin/python benchmarks/bench_strategies.py [--dataset mfeat] [--epochs 3] [--rounds 3]

Each (round, strategy) runs in a fresh process, so every strategy's peak memory is its own and
no strategy inherits another's warm caches; the strategies are interleaved (order rotated each
round) and the median of the rounds is reported with the serial/parallel ratio. On a shared
machine the load is printed with every round: compare rounds taken under similar load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load_note  # noqa: E402


def one(args) -> None:
    """Child mode: train once with args.one and print the report as JSON."""
    from sdml_ext.data import load_dataset
    from sdml_ext.model import make_projection
    from sdml_ext.engine.strategies import train_tasks
    from sdml_ext.engine.training import TrainOptions, make_tasks

    ds = load_dataset(args.dataset, args.data)
    names = args.modalities.split(",") if args.modalities else ds.modality_names
    opts = TrainOptions(epochs=args.epochs)
    P = make_projection(opts.code_dim, ds.num_classes, opts.seed)
    report = train_tasks(make_tasks([ds[n] for n in names], P, opts), args.one)
    print(json.dumps({
        "wall_s": report.wall_s,
        "peak_rss_mib": report.peak_rss_bytes / 2**20,
        "modalities": {r.name: r.time_s for r in report.modalities},
        "cpu_s": sum(r.cpu_s for r in report.modalities),
        "plan": report.plan,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mfeat")
    p.add_argument("--data")
    p.add_argument("--modalities", help="comma-separated subset (default: all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strategies", default="joint,serial,parallel", help="comma-separated subset to compare")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    strategies = args.strategies.split(",")
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    base = [sys.executable, __file__, "--dataset", args.dataset, "--epochs", str(args.epochs)]
    base += ["--data", args.data] if args.data else []
    base += ["--modalities", args.modalities] if args.modalities else []
    for r in range(args.rounds):
        order = strategies[r % len(strategies):] + strategies[: r % len(strategies)]
        for strategy in order:
            note = load_note()
            proc = subprocess.run([*base, "--one", strategy], capture_output=True, text=True, check=True)
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            # Training CPU seconds (workers included, start-up not) over the run's wall time: the
            # cores it actually got. Well under the core count means other work took the machine.
            run["cores_used"] = run["cpu_s"] / run["wall_s"]
            results[strategy].append(run)
            times = ", ".join(f"{k} {v:.1f}" for k, v in run["modalities"].items() if v is not None)
            print(f"round {r} {strategy:>8}: {run['wall_s']:6.1f} s, peak {run['peak_rss_mib']:6.0f} MiB, "
                  f"cores used {run['cores_used']:.2f} ({note} before)  per modality: {times}", flush=True)
    print(f"\n{args.dataset}, {args.epochs} epochs, median of {args.rounds} rounds:")
    median = {s: statistics.median(r["wall_s"] for r in runs) for s, runs in results.items()}
    for s in strategies:
        peak = statistics.median(r["peak_rss_mib"] for r in results[s])
        print(f"  {s:>8}: {median[s]:6.1f} s  peak RSS {peak:6.0f} MiB")
    if "parallel" in median:
        for s in (s for s in strategies if s != "parallel"):
            print(f"  {s} / parallel = {median[s] / median['parallel']:.2f}x")
        print(f"  parallel plan: {results['parallel'][-1]['plan']}")


if __name__ == "__main__":
    main()
