"""``python -m sdml_ext.info``: how the extension was built and what it chose on this machine.

Prints :func:`sdml_ext.build_info` as lines ``key: value``, including the CPU tile GEMM choice
(``cpu_gemm``: the library, how it was chosen, the measured rates, the cache file); the choice is
made (measured, or read from the cache) if this process has not made it yet. ``--json`` prints
the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys


def _lines(info: dict, indent: str = "") -> list[str]:
    out = []
    for key, value in info.items():
        if isinstance(value, dict):
            out.append(f"{indent}{key}:")
            out.extend(_lines(value, indent + "  "))
        else:
            out.append(f"{indent}{key}: {value}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdml_ext.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from ._extension import build_info

    try:
        info = build_info()
    except ValueError as exc:  # a bad SDML_CPU_GEMM or SDML_LOSS_STREAM
        print(f"python -m sdml_ext.info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else "\n".join(_lines(info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
