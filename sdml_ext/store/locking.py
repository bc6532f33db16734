"""Exclusive locks that say who holds them: one writer at a time for a bundle or a run's
checkpoint directory, across processes (and, on file systems whose flock works across hosts,
machines). The lock is an ``flock`` on a small file that also records the holder's pid and host;
the kernel drops it when the holder dies, however it dies, so a stale lock cannot outlive a
killed run. Taking a lock never waits: a second writer fails at once with a clear message,
before it has spent any time. A process may nest locks on the same file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator

from ..errors import LockedError

_held: dict[str, tuple[int, int]] = {}  # resolved path -> (fd, depth) held by this process
_guard = threading.Lock()


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file at `path` (created if missing) for the block. `what` names the
    locked thing in the error, e.g. "bundle runs/x". Raises LockedError naming the holder."""
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{what} is in use by another run ({_holder(fd)}); wait until it ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        with _guard:
            _held[key] = (fd, 1)
        try:
            yield
        finally:
            with _guard:
                del _held[key]
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
