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
import socket
import sys
from pathlib import Path

from ..errors import JobStopped, UnsafePathError
from ..store.confine import no_links, private_temp_dir, read_regular, remove_tree
from ..store.files import write_atomic
from ..store.locking import exclusive
from .checkpoint import Checkpoints
from .signals import process_alive

SUFFIX = ".partial"
MAX_RECORD_BYTES = 1 << 24  # run.json and owner files are small: a larger one is not ours
RUN_FILE = "run.json"


def run_dir_for(out: str | os.PathLike) -> Path:
    """Where the run writing `out` keeps its checkpoints."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def output_for(run_dir: str | os.PathLike) -> Path:
    """The output (absolute) of the run directory `run_dir` (``OUT.partial`` -> ``OUT``)."""
    run_dir = Path(os.path.abspath(run_dir))
    if not run_dir.name.endswith(SUFFIX) or run_dir.name == SUFFIX:
        raise ValueError(f"{run_dir} is not a run directory (its name does not end with {SUFFIX})")
    return run_dir.with_name(run_dir.name.removesuffix(SUFFIX))


def check_record(record, where: str) -> dict:
    """`record` (run.json's content) checked for what the flows read; ValueError naming the field."""
    def fail(field, problem):
        raise ValueError(f"{where}: {field} {problem}; remove the run directory to start over")

    if not isinstance(record, dict):
        fail("the record", "is not a JSON object")
    if record.get("kind") not in ("train", "add-modality"):
        fail("kind", f"must be 'train' or 'add-modality', got {record.get('kind')!r}")
    if not isinstance(record.get("config"), dict):
        fail("config", "is missing or not an object")
    if record["kind"] == "add-modality":
        names = record.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            fail("names", f"must be a non-empty list of modality names, got {names!r}")
        first = record.get("first_index")
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            fail("first_index", f"must be an integer >= 0, got {first!r}")
    return record


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
        self.continue_with = resume_command(path)  # how the user continues a stopped run
        self._stack = contextlib.ExitStack()

    @property
    def output(self) -> Path:
        """The bundle the run writes (``config.out``) or extends (``into``, adding modalities):
        always the directory's sibling OUT of ``OUT.partial``, whatever run.json says, so that a
        crafted record cannot send the writes elsewhere and ``--resume`` works from any directory."""
        return output_for(self.path)

    @staticmethod
    def check_free(path: Path) -> None:
        """Refuse to start a new run where an interrupted one left its checkpoints."""
        if path.exists():
            if (path / "lock").exists():
                with exclusive(path / "lock", f"output {str(path).removesuffix(SUFFIX)}"):
                    pass  # LockedError (naming the holder) while a live run works there
            if not os.path.lexists(path / RUN_FILE) and not any(path.glob("checkpoints/ckpt-*")):
                # A run that failed while creating it (e.g. a full disk): nothing to continue.
                remove_tree(path)
                return
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
        made = not path.exists()
        path.mkdir(parents=True, exist_ok=exist_ok)
        try:
            write_atomic(path / RUN_FILE, (json.dumps(record, indent=1) + "\n").encode())
        except BaseException:
            if made:  # e.g. a full disk: leave nothing that a rerun would have to clear by hand
                remove_tree(path)
            raise
        return cls(path, record, lock_name)

    @classmethod
    def resume(cls, path: str | os.PathLike, lock_name: str = "lock") -> RunDir:
        """The run directory at `path` (or the one of the output `path`), to continue it."""
        path = Path(os.path.abspath(path))
        if not path.name.endswith(SUFFIX) or path.name == SUFFIX:
            path = run_dir_for(path)
        try:
            file = no_links(path, RUN_FILE, "run record")
            record = json.loads(read_regular(file, "run record", max_bytes=MAX_RECORD_BYTES).decode("utf-8"))
        except FileNotFoundError:
            raise ValueError(f"--resume {path}: no interrupted run there (no {RUN_FILE})") from None
        except UnsafePathError:
            raise
        except (OSError, ValueError) as exc:
            raise ValueError(f"--resume {path}: unreadable {RUN_FILE} ({exc})") from None
        return cls(path, check_record(record, str(path / RUN_FILE)), lock_name)

    def __enter__(self) -> RunDir:
        for name in (self.lock_name, f"owner-{self.lock_name}.json", "checkpoints"):
            no_links(self.path, name, "run directory entry")  # writes never go through a link
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
                remove_tree(self.path)
            elif exc is not None:
                hint = f"checkpoints are kept in {self.path}; continue with: {self.continue_with}"
                if isinstance(exc, KeyboardInterrupt):
                    exc.resume_hint = hint
                else:
                    print(hint, file=sys.stderr)
        finally:
            self._stack.close()

    def remove(self) -> None:
        """The run is complete: its checkpoints are no longer needed."""
        remove_tree(self.path)

    def _clean_leftovers(self) -> None:
        """What a process of this run that was killed left behind (we hold the run's lock)."""
        removed = []
        owner_file = self.path / f"owner-{self.lock_name}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            owner = json.loads(read_regular(owner_file, "owner record", max_bytes=MAX_RECORD_BYTES))
            if owner["host"] == socket.gethostname() and os.path.isdir(owner["mp_tempdir"]) and not process_alive(owner["pid"]):
                try:  # the only thing outside the run's folders ever removed: multiprocessing's own
                    tempdir = private_temp_dir(owner["mp_tempdir"], "pymp-", f"mp_tempdir in {owner_file}")
                except UnsafePathError as exc:
                    print(f"warning: {exc}", file=sys.stderr)
                else:
                    remove_tree(tempdir)
                    removed.append(str(tempdir))
        if self.lock_name == "lock":  # the process that writes the output
            for tmp in self.output.parent.glob(f".{self.output.name}.tmp-*"):
                remove_tree(tmp)
                removed.append(str(tmp))
        if removed:
            removed = list(dict.fromkeys(removed))  # each path once
            print(f"removed what an interrupted run left behind: {', '.join(removed)}", file=sys.stderr)

