"""Prints a pytest-benchmark JSON as a compact table: median per case, ratio to the fastest of its group.

Usage: python benchmarks/report.py BENCH.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print(f"machine: {data.get('machine_note', '?')}, torch {data.get('torch', '?')}")
    for group, cases in sorted(groups.items()):
        best = min(c["stats"]["median"] for c in cases)
        print(f"\n{group}")
        for c in sorted(cases, key=lambda c: c["stats"]["median"]):
            median = c["stats"]["median"]
            extra = "".join(f"  {k}={v:.3g}" for k, v in c.get("extra_info", {}).items() if isinstance(v, float))
            print(f"  {c['name']:<60s} {median * 1e3:10.3f} ms  x{median / best:5.2f}{extra}")


if __name__ == "__main__":
    main(sys.argv[1])
