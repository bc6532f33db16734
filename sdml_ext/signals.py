"""Stopping a run cleanly: SIGTERM (``kill``, ``timeout``, batch schedulers, ``docker stop``)
is handled like Ctrl-C in the main process, and worker processes die with the run.

- :func:`terminate_as_interrupt` makes SIGTERM raise :class:`Terminated` (a KeyboardInterrupt),
  so the same cleanup runs for both signals: workers are ended, temporary files removed,
  checkpoints kept, and the command that resumes the run printed.
- :func:`bind_to_parent` (called first thing in a worker process) asks Linux to SIGKILL the
  worker when its parent dies, even by SIGKILL, and leaves Ctrl-C to the parent, which ends its
  workers itself. Parallel CPU workers are children of multiprocessing's fork server, which exits
  when the main process is gone, so they follow the main process within a moment.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled like Ctrl-C, with exit status 143."""

    exit_status = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt():
    """While active (main thread only), SIGTERM raises Terminated."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bind_to_parent() -> None:
    """In a worker process: die with the parent; ignore Ctrl-C (the parent stops us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
