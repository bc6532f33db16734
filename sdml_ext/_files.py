"""File helpers shared by everything that writes or reads the user's directories (bundles, search
indexes, .npz datasets): temporary files are created private (mkstemp/mkdtemp: 0600/0700,
safetensors: 0600) and, once complete, given the permissions a plain create would have given
them; a directory's JSON manifest is read with one clear error for each way it can be missing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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
