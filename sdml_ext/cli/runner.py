"""What the command-line tools share: user errors become one line on stderr and exit status 2,
without a traceback (set SDML_DEBUG=1 to see it); a crashed training worker (not the input's
fault) is one line and exit status 1, as is a distributed job that stopped because one of its
ranks failed; Ctrl-C exits with 130; a reader that closes stdout early (``| head``) ends the
command quietly with status 141, as a Unix tool killed by SIGPIPE. Only this module ends a
process or chooses its exit status. Outputs are written atomically (see sdml_ext.store.bundle),
so an interrupted or failed run leaves no half-written bundle."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..engine.signals import terminate_as_interrupt
from ..errors import BundleError, JobStopped, ModalityError, WorkerCrash
from .pipes import SIGPIPE_STATUS, silence_stdout, stdout_closed

# What bad input raises: data-layer ValueError/MissingKeyError, missing files, unreadable paths,
# bundle problems and a modality that failed because of its data (ModalityError names it).
USER_ERRORS = (ValueError, OSError, BundleError, ModalityError, FloatingPointError)


def say(line: str) -> None:
    """`line` on stderr as one write: the ranks of a distributed job share one stderr, and
    print's two writes (the text, then the newline) interleave with another rank's when stderr is
    unbuffered, running two ranks' lines together."""
    if sys.stderr is not None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into a message and an exit status. SIGTERM is
    handled like Ctrl-C (exit status 143 instead of 130); an interrupted training run says how
    to continue it."""
    debug = bool(os.environ.get("SDML_DEBUG"))
    try:
        with terminate_as_interrupt():
            status = main(argv)
            if sys.stdout is not None:
                sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
            return status
    except KeyboardInterrupt as exc:
        hint = getattr(exc, "resume_hint", None)
        say("interrupted" + (f"; {hint}" if hint else ""))
        return getattr(exc, "exit_status", 130)
    except JobStopped as exc:
        if debug:
            raise
        if exc.message:
            say(f"error: {exc.message}")
        return exc.exit_status
    except WorkerCrash as exc:
        if debug:
            if exc.detail:
                print(f"the worker's traceback:\n{exc.detail}", file=sys.stderr)
            raise
        say(f"error: training crashed (not caused by the input): {exc}; SDML_DEBUG=1 shows the traceback")
        return 1
    except USER_ERRORS as exc:
        if isinstance(exc, BrokenPipeError) and stdout_closed():  # the reader left (| head): not an error
            silence_stdout()
            return SIGPIPE_STATUS
        if debug:
            raise
        say(f"error: {exc}")
        return 2


def stop_process(message: str | None) -> None:
    """End this process at once with status 1, from any thread, after printing `message` (if
    any) as one error line: a distributed rank whose job failed elsewhere, which may be inside a
    computation or a collective that an exception would not interrupt."""
    if message:
        say(f"error: {message}")
    os._exit(JobStopped.exit_status)
