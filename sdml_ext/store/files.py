"""Files and directories that survive the writer being stopped at any instant, and the checks
that tell a reader they are what was written.

- :func:`write_atomic` replaces a file: write to a temporary name in the same directory, fsync,
  rename over the target, fsync the directory. A reader sees the old contents or the new, never a
  mixture; a stopped writer leaves at most a ``.NAME.tmp-PID`` file, which the next writer of the
  same run removes. :func:`write_json_atomic` does so for JSON.
- :func:`write_new_file` creates a file that must not exist (hard-linked into place, so it never
  replaces one that appeared meanwhile).
- :func:`new_directory` assembles a new directory (a bundle, a search index) in a temporary
  sibling and renames it into place, which never replaces a non-empty directory; any failure
  removes what was written.
- :func:`sha256_file` and :func:`tensor_checksum` are the checksums manifests record;
  :func:`safetensors_metadata` reads a safetensors file's metadata without its tensors.

Temporary files are created private (mkstemp/mkdtemp: 0600/0700, safetensors: 0600) and, once
complete, given the permissions a plain create would have given them (:func:`publish`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .confine import create_temporary

# ---- permissions ---------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only be read by setting it, and setting it (even for a moment) changes the
    permissions of files other threads create meanwhile. Linux reports it in /proc/self/status;
    elsewhere it is inferred from the mode of a directory created with mode 0777.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with tempfile.TemporaryDirectory(prefix=".sdml-umask-") as scratch:
        probe = os.path.join(scratch, "probe")
        os.mkdir(probe, 0o777)
        return ~os.stat(probe).st_mode & 0o777


def publish(path: str | os.PathLike, mode: int) -> None:
    """Give `path` `mode` (0o666 for files, 0o777 for directories) less the umask, as a plain
    create would."""
    os.chmod(path, mode & ~current_umask())


# ---- durable writes ------------------------------------------------------------------------------


class WriteFailed(OSError):
    """Writing a file failed (a full disk, a quota, an I/O error): the message names the file."""

    def __str__(self) -> str:
        return self.args[-1] if self.args else "write failed"


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Failures while writing `path` (OSError, or safetensors' own error for the same causes)
    become one :class:`WriteFailed` naming the file: "cannot write PATH: No space left on device"."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as exc:
        raise WriteFailed(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        reason = "No space left on device" if "No space left" in str(exc) or "StorageFull" in str(exc) else str(exc)
        raise WriteFailed(None, f"cannot write {path}: {reason}") from None


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file written by someone else (e.g. safetensors) to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    """Replace `path` with `data` atomically and durably (permissions `mode` less the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        fd = create_temporary(tmp, mode)  # never written through a link planted under its name
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves nothing half-written behind
            raise
        fsync_dir(path.parent)


def _json_default(value):
    import numpy as np  # numpy scalars come from metrics and records

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_safe(value):
    """JSON has no NaN: NaN/Inf floats (e.g. a loss with no validation data) become None."""
    import numpy as np

    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_bytes(data, indent: int | None = 1) -> bytes:
    """`data` as strict JSON (no NaN/Inf; numpy scalars and paths converted), newline-terminated."""
    return (json.dumps(data, indent=indent, allow_nan=False, default=_json_default) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, data, shown_as: str | os.PathLike | None = None) -> None:
    """Write `data` as strict JSON (:func:`json_bytes`) to a file of a directory that is not
    published yet (see :func:`new_directory`), fsynced. A failure names `shown_as` (the file's
    path once the directory is published) if given."""
    with writing(shown_as or path), open(path, "wb") as f:
        f.write(json_bytes(data))
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Replace `path` with `data` as strict JSON (:func:`json_bytes`), atomically and durably."""
    write_atomic(path, json_bytes(data))


def write_new_file(path, write: Callable[[str], object]) -> Path:
    """Create the file `path` with ``write(tmp_path)``: written under a temporary name in the same
    directory, then hard-linked into place, which fails (FileExistsError) rather than replace a
    file that exists or appeared meanwhile; the temporary name is always removed."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"output {path} already exists; choose another path or remove it first")
    with writing(path):  # a full directory fails here already
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        with writing(path):
            write(tmp)
        publish(Path(tmp), 0o666)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"output {path} already exists; choose another path or remove it first") from None
    finally:
        os.unlink(tmp)
    return path


class NewDirectory:
    """A directory being assembled under a temporary sibling name (``.NAME.tmp-XXXX``, given the
    permissions of a plain mkdir); :meth:`publish` renames it to its final name. See
    :func:`new_directory`."""

    def __init__(self, path: Path, error: type[Exception], kind: str):
        self.path = path
        self.tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        self._error, self._kind = error, kind
        self.published = False
        try:
            publish(self.tmp, 0o777)
        except BaseException:
            self.abort()
            raise

    def publish(self) -> Path:
        """Rename the finished directory into place: fails (`error`) rather than replace a
        directory that is not empty."""
        try:
            os.rename(self.tmp, self.path)  # fails (ENOTEMPTY/EEXIST) rather than replace a non-empty dir
        except OSError as exc:
            raise self._error(
                f"cannot move the finished {self._kind} into place at {self.path}: {exc.strerror or exc}"
            ) from None
        self.published = True
        return self.path

    def abort(self) -> None:
        """Remove everything written (nothing, once published)."""
        if not self.published:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def new_directory(path: str | os.PathLike, *, error: type[Exception], kind: str) -> Iterator[NewDirectory]:
    """Assemble the new directory `path` in a temporary sibling (``.tmp`` of the yielded
    :class:`NewDirectory`); leaving the block normally publishes it by rename, an exception (or
    a failed rename, raised as `error` naming the `kind` of directory) removes the temporary
    directory and everything in it. The caller checks beforehand that `path` is free."""
    directory = NewDirectory(Path(path), error, kind)
    try:
        yield directory
        if not directory.published:
            directory.publish()
    except BaseException:
        directory.abort()
        raise


# ---- checksums and headers -----------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_checksum(t) -> str:
    """sha256 hex digest of a tensor's dtype, shape and raw bytes (CPU, contiguous)."""
    import torch

    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` map of safetensors bytes (ValueError if the header is truncated or
    not JSON); the tensors are not read."""
    if len(data) < 8:
        raise ValueError("truncated file")
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n:
        raise ValueError("truncated file")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


# ---- reading -------------------------------------------------------------------------------------


def read_directory_manifest(path: str | os.PathLike, name: str, kind: str, error: type[Exception]):
    """The parsed JSON file `name` in directory `path`, which holds an SDML `kind` ("bundle",
    "search index"). Raises `error` saying whether the directory is missing, is not a `kind`
    (no `name` in it) or holds an unreadable file; the caller checks the content."""
    path = Path(path)
    if not path.exists():
        raise error(f"{kind} not found: {path}")
    file = path / name
    if not file.is_file():
        raise error(f"{path} is not an SDML {kind} (no {name})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{file}: unreadable {kind} manifest ({exc})") from None
