"""Files that survive the writer being stopped at any instant: write to a temporary name in the
same directory, fsync, rename over the target, fsync the directory. A reader sees the old
contents or the new, never a mixture; a stopped writer leaves at most a ``.NAME.tmp-PID`` file,
which the next writer of the same run removes."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    """Replace `path` with `data` atomically and durably (permissions `mode` less the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
