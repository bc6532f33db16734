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
- bad arguments, the launcher's or those of ``-m sdml_ext.train`` (checked here before any rank
  starts, so that the job says it once, not once per rank): argparse's message, or one line
  naming the flag, status 2;
- a launcher problem (rendezvous failure): one line, status 1.

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
from .arguments import refuse_empty
from .pipes import SIGPIPE_STATUS, silence_stdout, stdout_closed
from .runner import run, say


def _failure_line(failures: dict) -> str | None:
    """One line for a job whose failed ranks all died by a signal (none could speak), else None."""
    if any(f.exitcode > 0 for f in failures.values()):
        return None
    parts = [f"rank {rank} (pid {f.pid}) ended by {f.signal_name()}" for rank, f in sorted(failures.items())]
    return f"error: on {socket.gethostname()}: {'; '.join(parts)}; the job stops"


def _count(text: str, flag: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number, got {text!r}") from None
    if value < least:
        raise ValueError(f"{flag} must be >= {least}, got {value}")
    return value


def check_arguments(parser, args) -> None:
    """Refuse, naming the flag, what torchrun would refuse with an assertion or a traceback
    (status 1) once it has started, and the training command's own bad arguments."""
    refuse_empty(parser, args)
    if args.nproc_per_node.lstrip("+-").isdigit():  # else a word: auto, cpu, gpu, xpu (torchrun's)
        _count(args.nproc_per_node, "--nproc-per-node", 1)
    nodes = args.nnodes.split(":")
    if len(nodes) > 2:
        raise ValueError(f"--nnodes must be N or MIN:MAX, got {args.nnodes!r}")
    low, high = (_count(n, "--nnodes", 1) for n in (nodes[0], nodes[-1]))
    if low > high:
        raise ValueError(f"--nnodes {args.nnodes}: MIN is more than MAX")
    _count(str(args.max_restarts), "--max-restarts", 0)
    _count(str(args.node_rank), "--node-rank", 0)
    if args.module and args.training_script == "sdml_ext.train":
        from . import train

        train.parse(args.training_script_args)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent logs each failed rank at ERROR with its exit code; the ranks have said it already.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    parser = torchrun.get_args_parser()
    args = parser.parse_args(argv)
    status = run(lambda _: check_arguments(parser, args) or 0)
    if status:
        return status
    try:
        torchrun.run(args)
        return 0
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        line = _failure_line(exc.failures)
        if line:
            say(line)
        return max([f.exitcode for f in exc.failures.values() if f.exitcode > 0], default=1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001  (rendezvous and launcher errors: one line)
        if isinstance(exc, BrokenPipeError) and stdout_closed():  # the reader left (| head)
            silence_stdout()
            return SIGPIPE_STATUS
        if os.environ.get("SDML_DEBUG"):
            raise
        say(f"error: torchrun: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
