"""``python -m sdml_ext.evaluate``: evaluate a bundle. The command line lives in
:mod:`sdml_ext.cli.evaluate`; this module is its entry point."""

import sys

from .cli import run
from .cli.evaluate import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run(main))
