"""The one rule for paths that come from disk: a file the program reads (a run folder's record,
a bundle's manifest, a search index's manifest) may name paths, and whoever handed the folder
over may have crafted them. So:

- A path a folder names is resolved and must stay inside that folder (:func:`inside`), and is
  reached without passing through a symbolic link (:func:`no_links`).
- Writes never follow a symbolic link: files are opened with ``O_NOFOLLOW`` (:func:`open_write`),
  temporary files are created with ``O_EXCL`` (a link planted under their name is removed, never
  written through), and a directory that is written into must not be a link.
- Removing a directory never follows a link (:func:`remove_tree`): a link is unlinked, never
  its target.
- A file is read only if it is a regular file, and no more bytes than its size
  (:func:`read_regular`): a FIFO, a device or a link to one is refused at once (no hang, no
  endless read).

Every failure is an :class:`~sdml_ext.errors.UnsafePathError` (a ValueError: one line naming the
path and what it was supposed to be).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import UnsafePathError


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """`path` (relative paths are taken relative to `root`) resolved, which must lie inside the
    resolved `root` (or be it); UnsafePathError naming `what` otherwise."""
    root = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(root / path))
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"{what} ({path}) leads outside {root}; refusing to use it")
    return resolved


def no_links(root: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """``root / path``, checked component by component below `root` not to be a symbolic link
    (missing components are fine: they will be created as plain files or directories)."""
    root = Path(root)
    relative = Path(path)
    if relative.is_absolute():
        try:
            relative = relative.relative_to(root)
        except ValueError:
            raise UnsafePathError(f"{what} ({path}) is not inside {root}; refusing to use it") from None
    if ".." in relative.parts:
        raise UnsafePathError(f"{what} ({path}) leads outside {root}; refusing to use it")
    current = root
    for part in relative.parts:
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                raise UnsafePathError(f"{what} {current} is a symbolic link; refusing to follow it")
        except FileNotFoundError:
            break
    return root / relative


def open_write(path: str | os.PathLike, flags: int, mode: int = 0o666, what: str = "file") -> int:
    """``os.open(path, flags | O_NOFOLLOW)``: a symbolic link at `path` is refused
    (UnsafePathError), never written through; so is anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{what} {path} is a symbolic link; refusing to write through it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{what} {path} is not a regular file; refusing to write to it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_temporary(path: str | os.PathLike, mode: int = 0o600) -> int:
    """A new file at `path` (a temporary name: whatever is there, a link included, is unlinked
    first), created exclusively and without following links; its fd."""
    with _suppress_missing():
        os.unlink(path)
    return open_write(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, what="temporary file")


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove the directory `path` and what is in it; if `path` is a link (or a file), only it
    is removed. Links inside are unlinked, never followed (shutil.rmtree's rule)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with _suppress_missing():
            os.unlink(path)


def private_temp_dir(path: str | os.PathLike, prefix: str, what: str) -> Path:
    """`path`, checked to be a directory made by this user directly in the system's temporary
    directory with a name starting with `prefix` (e.g. multiprocessing's ``pymp-``): the only
    place outside a run folder that the program ever removes."""
    path = Path(path)
    tmp = Path(os.path.realpath(tempfile.gettempdir()))
    if path.parent != tmp or not path.name.startswith(prefix) or path.name in (".", ".."):
        raise UnsafePathError(f"{what} ({path}) is not a {prefix}* directory in {tmp}; refusing to remove it")
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UnsafePathError(f"{what} ({path}) is not a directory of this user; refusing to remove it")
    return path


def check_regular(path: str | os.PathLike, what: str) -> os.stat_result:
    """The stat of `path` (links followed), which must be a regular file."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a regular file; refusing to read it")
    return st


def read_regular(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `path`, at most its size when opened (a FIFO or a device is
    refused without blocking; so is a file over `max_bytes`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a regular file; refusing to read it")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafePathError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} expected")
        os.set_blocking(fd, True)
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
