"""What the command-line tools share: user errors become one line on stderr and exit status 2,
without a traceback (set SDML_DEBUG=1 to see it); Ctrl-C exits with 130. Outputs are written
atomically (see sdml_ext.bundle), so an interrupted or failed run leaves no half-written bundle."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .bundle import BundleError
from .signals import terminate_as_interrupt
from .strategies import WorkerError

# What bad input raises: data-layer ValueError/MissingKeyError, missing files, unreadable paths,
# bundle problems and a modality that failed to train (WorkerError carries its own message).
USER_ERRORS = (ValueError, OSError, BundleError, WorkerError, FloatingPointError)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into a message and an exit status. SIGTERM is
    handled like Ctrl-C (exit status 143 instead of 130); an interrupted training run says how
    to continue it."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "sdml_ext"
    try:
        with terminate_as_interrupt():
            return main(argv)
    except KeyboardInterrupt as exc:
        hint = getattr(exc, "resume_hint", None)
        print(f"{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return getattr(exc, "exit_status", 130)
    except USER_ERRORS as exc:
        if os.environ.get("SDML_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
