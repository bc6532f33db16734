"""``python -m sdml_ext.launch``: torchrun (``torch.distributed.run``, same arguments) whose output
ends with the project's own line.

torchrun itself reports a failed or interrupted job with its own tracebacks: after Ctrl-C the
ranks print how to continue, then the agent prints ``SignalException`` and exits 1; after a rank
dies, the surviving rank names it, then the agent prints ``ChildFailedError`` with its failure
table. This launcher runs the same agent in-process and ends differently:

- success: status 0;
- Ctrl-C / SIGTERM / SIGHUP to the agent: the agent stops the ranks as torchrun does (each prints
  its line), then status 128 + the signal, nothing more;
- a failed job: the ranks' own lines (sdml_ext.train names the failing or vanished rank), then the
  first failed rank's exit status (1 for a rank that died by a signal); one line is added only when
  no rank could say anything (every failed rank died by a signal);
- a launcher problem (bad arguments: argparse's message; rendezvous failure): one line, status 1.

The agent's own log lines below ERROR are left as torchrun prints them; its per-failure ERROR
records are dropped, since the ranks' lines say the same thing in the project's words.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

# Importing this module imports the package first (sdml_ext/__init__.py): its OpenMP wait policy
# is in the environment the ranks inherit.
from .pipes import SIGPIPE_STATUS, silence_stdout, stdout_closed


def _failure_line(failures: dict) -> str | None:
    """One line for a job whose failed ranks all died by a signal (none could speak), else None."""
    if any(f.exitcode > 0 for f in failures.values()):
        return None
    parts = [f"rank {rank} (pid {f.pid}) ended by {f.signal_name()}" for rank, f in sorted(failures.items())]
    return f"error: on {socket.gethostname()}: {'; '.join(parts)}; the job stops"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent logs each failed rank at ERROR with its exit code; the ranks have said it already.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = torchrun.parse_args(argv)
    try:
        torchrun.run(args)
        return 0
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        line = _failure_line(exc.failures)
        if line:
            print(line, file=sys.stderr)
        return max([f.exitcode for f in exc.failures.values() if f.exitcode > 0], default=1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001  (rendezvous and launcher errors: one line)
        if isinstance(exc, BrokenPipeError) and stdout_closed():  # the reader left (| head)
            silence_stdout()
            return SIGPIPE_STATUS
        if os.environ.get("SDML_DEBUG"):
            raise
        print(f"error: torchrun: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
