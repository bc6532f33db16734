"""The OpenMP wait policy sdml_ext chooses (passive: idle threads sleep at once) against the
runtime's default (libgomp spins ~300,000 iterations first), for the README's command on a busy
machine: ``python -m sdml_ext.train --strategy serial`` (2 threads on a 2-core machine) with
`--burn` CPU-bound processes running beside it.

Run: .venv/bin/python -P benchmarks/bench_wait_policy.py [--burn 1] [--rounds 3] [--epochs 8]

Each (round, variant) is a fresh process, timed from start to exit; the variants alternate
(order flipped every round); the median of the rounds and the ratio are printed with the load.
The runtime's default is reproduced with GOMP_SPINCOUNT=300000, libgomp's spin count when
OMP_WAIT_POLICY is unset (OMP_DISPLAY_ENV=VERBOSE shows both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "sdml_ext's choice (PASSIVE)": {},
    "runtime default (spin 300000)": {"GOMP_SPINCOUNT": "300000"},
}


def load_note() -> str:
    return f"load1={os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--burn", type=int, default=1, help="CPU-bound processes running beside the runs (default: 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--modalities", default="fou,kar,pix")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burn)]
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
                for name in order:
                    out = os.path.join(tmp, f"run-{r}-{len(times[name])}-{order.index(name)}")
                    command = [sys.executable, "-m", "sdml_ext.train", "--dataset", "mfeat", "--strategy", "serial",
                               "--modalities", args.modalities, "--epochs", str(args.epochs), "--out", out]
                    note = load_note()
                    t0 = time.perf_counter()
                    subprocess.run(command, env={**env, **VARIANTS[name]}, check=True, capture_output=True)
                    times[name].append(time.perf_counter() - t0)
                    print(f"round {r}: {name:<30} {times[name][-1]:7.1f} s  ({note} before, {args.burn} burner(s))",
                          flush=True)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"median {name:<30} {m:7.1f} s")
    base, other = medians.values()
    print(f"runtime default / sdml_ext's choice: {other / base:.2f}x")


if __name__ == "__main__":
    main()
