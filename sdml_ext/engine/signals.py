"""Stopping a run cleanly: SIGTERM (``kill``, ``timeout``, batch schedulers, ``docker stop``)
is handled like Ctrl-C in the main process, and worker processes die with the run.

- :func:`terminate_as_interrupt` makes SIGTERM raise :class:`Terminated` (a KeyboardInterrupt),
  so the same cleanup runs for both signals: workers are ended, temporary files removed,
  checkpoints kept, and the command that resumes the run printed.
- :func:`bind_to_parent` (called first thing in a worker process) ends the worker when the main
  process or its direct parent dies, even by SIGKILL, and leaves Ctrl-C to the main process,
  which ends its workers itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
import time

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


def bind_to_parent(main_pid: int) -> None:
    """In a worker process: die with the main process `main_pid` and with the direct parent;
    ignore Ctrl-C (the main process stops its workers itself).

    A parallel worker is a child of multiprocessing's fork server, not of the main process, and
    the fork server lives as long as any of its children: so the worker watches the main process
    itself (a pidfd, which cannot be fooled by pid reuse) and exits when it is gone; the fork
    server and the resource tracker then see their last client go and exit too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    threading.Thread(target=_exit_when_gone, args=(main_pid,), name="sdml-parent-watch", daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (OSError, AttributeError):  # no pidfd (old kernel, not Linux): poll the pid
        while process_alive(pid):
            time.sleep(0.5)
        os._exit(1)
    select.select([fd], [], [])  # readable once the process has exited
    os._exit(1)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
