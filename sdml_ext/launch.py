"""``python -m sdml_ext.launch``: torchrun (same arguments) whose output ends with the project's own
line. The launcher lives in :mod:`sdml_ext.cli.launch`; this module is its entry point."""

import sys

from .cli.launch import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
