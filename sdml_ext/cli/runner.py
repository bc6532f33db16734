"""What the command-line tools share: user errors become one line on stderr and exit status 2,
without a traceback (set SDML_DEBUG=1 to see it); a crashed training worker (not the input's
fault) is one line and exit status 1, as is a distributed job that stopped because one of its
ranks failed; Ctrl-C exits with 130. Only this module ends a process or chooses its exit status. Outputs are written atomically
(see sdml_ext.store.bundle), so an interrupted or failed run leaves no half-written bundle."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..engine.signals import terminate_as_interrupt
from ..errors import BundleError, JobStopped, ModalityError, WorkerCrash

# What bad input raises: data-layer ValueError/MissingKeyError, missing files, unreadable paths,
# bundle problems and a modality that failed because of its data (ModalityError names it).
USER_ERRORS = (ValueError, OSError, BundleError, ModalityError, FloatingPointError)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into a message and an exit status. SIGTERM is
    handled like Ctrl-C (exit status 143 instead of 130); an interrupted training run says how
    to continue it."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "sdml_ext"
    debug = bool(os.environ.get("SDML_DEBUG"))
    try:
        with terminate_as_interrupt():
            return main(argv)
    except KeyboardInterrupt as exc:
        hint = getattr(exc, "resume_hint", None)
        print(f"{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return getattr(exc, "exit_status", 130)
    except JobStopped as exc:
        if debug:
            raise
        if exc.message:
            print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return exc.exit_status
    except WorkerCrash as exc:
        if debug:
            if exc.detail:
                print(f"the worker's traceback:\n{exc.detail}", file=sys.stderr)
            raise
        print(f"error: training crashed (not caused by the input): {exc}; "
              f"SDML_DEBUG=1 shows the traceback", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def stop_process(message: str | None) -> None:
    """End this process at once with status 1, from any thread, after printing `message` (if
    any) as one error line: a distributed rank whose job failed elsewhere, which may be inside a
    computation or a collective that an exception would not interrupt."""
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(JobStopped.exit_status)
