"""A training run's working directory, next to its output: ``OUT.partial/``.

    OUT.partial/
      run.json        what the run is (kind, resolved config, modalities, the bundle it extends):
                      ``--resume OUT.partial`` continues it with exactly these settings
      checkpoints/    ckpt-NN.safetensors per modality (see sdml_ext.engine.checkpoint)
      lock            held while a process works on the run (see sdml_ext.store.locking)
      owner.json      pid, host and multiprocessing temporary directory of the last process

The directory exists from the moment training starts until the bundle is complete; then it is
removed. Holding its lock means no other process writes OUT, so leftovers of a killed process
(its half-assembled ``.OUT.tmp-*`` bundle, its multiprocessing temporary directory) are removed
when the next process takes the run over, and it says so.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.util
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

from ..errors import JobStopped
from ..store.files import write_atomic
from ..store.locking import exclusive
from .checkpoint import Checkpoints
from .signals import process_alive

SUFFIX = ".partial"
RUN_FILE = "run.json"


def run_dir_for(out: str | os.PathLike) -> Path:
    """Where the run writing `out` keeps its checkpoints."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def resume_command(path: str | os.PathLike) -> str:
    return f"python -m sdml_ext.train --resume {shlex.quote(str(path))}"


class RunDir:
    """An open run directory (use :meth:`create` or :meth:`resume`, then ``with run:``).

    record: the content of run.json. output: the path the run finally writes (a new bundle, or
    the bundle it extends), as the record says. lock_name: one lock file per process that trains in the directory
    (distributed ranks sharing a host each take their own).
    """

    def __init__(self, path: Path, record: dict, lock_name: str = "lock"):
        self.path = path
        self.record = record
        self.lock_name = lock_name
        self.checkpoints = Checkpoints(str(path / "checkpoints"))
        self.uses_workers = True  # False: this process starts no worker processes (a distributed rank)
        self._stack = contextlib.ExitStack()

    @property
    def output(self) -> Path:
        """The bundle the run writes (``config.out``) or extends (``into``, adding modalities)."""
        record = self.record
        return Path(record["into"] if record.get("kind") == "add-modality" else record["config"]["out"])

    @staticmethod
    def check_free(path: Path) -> None:
        """Refuse to start a new run where an interrupted one left its checkpoints."""
        if path.exists():
            if (path / "lock").exists():
                with exclusive(path / "lock", f"output {path.name.removesuffix(SUFFIX)}"):
                    pass  # LockedError (naming the holder) while a live run works there
            raise ValueError(
                f"{path} holds the checkpoints of an earlier run on the same output; continue it with "
                f"`{resume_command(path)}`, or remove {path} to start over"
            )

    @classmethod
    def create(cls, path: Path, record: dict, lock_name: str = "lock", exist_ok: bool = False) -> RunDir:
        """A new run directory holding `record` (exist_ok: take over one with the same record)."""
        if exist_ok and (path / RUN_FILE).exists():
            run = cls.resume(path, lock_name)
            if run.record != json.loads(json.dumps(record)):
                raise ValueError(f"{path} holds the checkpoints of a run with other settings; remove it to start over")
            return run
        if not exist_ok:
            cls.check_free(path)
        path.mkdir(parents=True, exist_ok=exist_ok)
        write_atomic(path / RUN_FILE, (json.dumps(record, indent=1) + "\n").encode())
        return cls(path, record, lock_name)

    @classmethod
    def resume(cls, path: str | os.PathLike, lock_name: str = "lock") -> RunDir:
        """The run directory at `path` (or the one of the output `path`), to continue it."""
        path = Path(path)
        if not path.name.endswith(SUFFIX) and not (path / RUN_FILE).exists():
            path = run_dir_for(path)
        try:
            record = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"--resume {path}: no interrupted run there (no {RUN_FILE})") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"--resume {path}: unreadable {RUN_FILE} ({exc})") from None
        return cls(path, record, lock_name)

    def __enter__(self) -> RunDir:
        self._stack.enter_context(exclusive(self.path / self.lock_name, f"run {self.path}"))
        self._clean_leftovers()
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        if self.uses_workers:
            # The directory multiprocessing's fork server will use (made now, so that it is known
            # if this process is killed).
            owner["mp_tempdir"] = multiprocessing.util.get_temp_dir()
        write_atomic(self.path / f"owner-{self.lock_name}.json", json.dumps(owner).encode())
        self.checkpoints.remove_stale_temporaries()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if isinstance(exc, JobStopped):
                pass  # the other ranks, and the restarted job, still work in the directory
            elif exc is not None and not any(Path(self.checkpoints.directory).glob("ckpt-*")):
                # Stopped before anything was worth keeping: a later run starts afresh.
                shutil.rmtree(self.path, ignore_errors=True)
            elif exc is not None:
                hint = f"checkpoints are kept in {self.path}; continue with: {resume_command(self.path)}"
                if isinstance(exc, KeyboardInterrupt):
                    exc.resume_hint = hint
                else:
                    print(hint, file=sys.stderr)
        finally:
            self._stack.close()

    def remove(self) -> None:
        """The run is complete: its checkpoints are no longer needed."""
        shutil.rmtree(self.path, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        """What a process of this run that was killed left behind (we hold the run's lock)."""
        removed = []
        owner_file = self.path / f"owner-{self.lock_name}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            owner = json.loads(owner_file.read_text())
            if owner["host"] == socket.gethostname() and os.path.isdir(owner["mp_tempdir"]) and not process_alive(owner["pid"]):
                shutil.rmtree(owner["mp_tempdir"], ignore_errors=True)
                removed.append(owner["mp_tempdir"])
        if self.lock_name == "lock":  # the process that writes the output
            for tmp in self.output.parent.glob(f".{self.output.name}.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(str(tmp))
        if removed:
            print(f"removed what an interrupted run left behind: {', '.join(removed)}", file=sys.stderr)

