"""``python -m sdml_ext.train``: train SDML, write a bundle, print the mAP table. The command line lives in
:mod:`sdml_ext.cli.train`; this module is its entry point."""

import sys

from .cli import run
from .cli.train import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run(main))
