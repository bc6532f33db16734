"""The README's default-run figures, regenerated: ``python -m sdml_ext.train`` (embedded digits,
6 views, 40 epochs, parallel) from start to exit in a fresh process, its mAP@all / mAP@50
averages, the wall time, the date, the machine and its load; plus a cheap fingerprint of the
same recipe (2 views, 2 epochs, serial) that CI recomputes (tests/test_readme_numbers.py).

Run: .venv/bin/python -P benchmarks/default_run.py [--out benchmarks/default_run.json]

The README quotes the figures this writes; the test checks that it does, and that the recipe
still produces the fingerprint recorded beside them, so a change that moves the README's
numbers fails CI until this is rerun and the README updated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "default_run.json"
FINGERPRINT_FLAGS = ["--modalities", "fou,kar", "--epochs", "2", "--strategy", "serial"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def averages(bundle: Path) -> dict:
    test = json.loads((bundle / "manifest.json").read_text())["metrics"]["test"]
    return {"map_all": test["map_all"]["average"], "map_at_50": test["map_at_50"]["average"]}


def fingerprint() -> dict:
    """The default recipe on 2 views for 2 epochs (seconds): per-modality train losses per epoch
    and the mAP averages. Runs in this process through the command-line entry point."""
    from sdml_ext import cli, train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fingerprint"
        if cli.run(train.main, [*FINGERPRINT_FLAGS, "--out", str(out)]) != 0:
            raise RuntimeError("the fingerprint run failed")
        manifest = json.loads((out / "manifest.json").read_text())
        losses = {m["name"]: [e["train_loss"] for e in m["training"]["history"]] for m in manifest["modalities"]}
        return {"flags": FINGERPRINT_FLAGS, "train_loss": losses, **averages(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULT), help=f"JSON to write (default: {RESULT.relative_to(HERE.parent)})")
    args = p.parse_args()
    load1 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdml_ext.train", "--out", "runs/default"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        full = averages(Path(tmp) / "runs" / "default")
    import sdml_ext  # noqa: F401  (first, as the commands do)
    import torch

    result = {
        "command": "python -m sdml_ext.train",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "load1_before": round(load1, 2),
        "torch": torch.__version__,
        "wall_s": round(wall, 1),
        **{k: round(v, 4) for k, v in full.items()},
        "fingerprint": fingerprint(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
