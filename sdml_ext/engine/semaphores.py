"""Named POSIX semaphores of the parallel strategy's queues, findable after a kill.

A forkserver/spawn worker pool shares its queues' locks as named semaphores (``/dev/shm/sem.*``
on Linux), which multiprocessing's resource tracker unlinks when the run ends. Killing the
run's whole process group kills the tracker too, and the semaphores stay until reboot. So a
run names them after itself (``mp-sdml<pid>-…``, multiprocessing's own naming with a prefix
that carries the creating process's pid), and every parallel run first removes those of
processes of this user that no longer exist.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .signals import process_alive

SHM = Path("/dev/shm")
_PATTERN = re.compile(r"^sem\.mp-sdml(\d+)-[A-Za-z0-9_]+$")


@contextlib.contextmanager
def named_for_this_run() -> Iterator[None]:
    """Semaphores created in the block are named ``/mp-sdml<pid>-XXXXXXXX``."""
    config = multiprocessing.process.current_process()._config
    previous = config.get("semprefix", "/mp")
    config["semprefix"] = f"/mp-sdml{os.getpid()}"
    try:
        yield
    finally:
        config["semprefix"] = previous


def remove_leaked() -> list[str]:
    """Unlink the semaphores of runs whose process is gone (this user's only); their names."""
    removed = []
    if not SHM.is_dir():
        return removed
    uid = os.getuid()
    for entry in SHM.iterdir():
        match = _PATTERN.match(entry.name)
        if not match or process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            st = entry.lstat()
            if st.st_uid == uid and entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry.name)
    return removed
