"""What the command-line tools share: user errors become one line on stderr and exit status 2,
without a traceback (set SDML_DEBUG=1 to see it); Ctrl-C exits with 130. Outputs are written
atomically (see sdml_ext.bundle), so an interrupted or failed run leaves no half-written bundle."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .bundle import BundleError
from .strategies import WorkerError

# What bad input raises: data-layer ValueError/MissingKeyError, missing files, unreadable paths,
# bundle problems and a modality that failed to train (WorkerError carries its own message).
USER_ERRORS = (ValueError, OSError, BundleError, WorkerError, FloatingPointError)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into a message and an exit status."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "sdml_ext"
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("SDML_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
