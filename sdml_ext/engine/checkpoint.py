"""Checkpoints of modality trainers, so that a stopped run continues where it was.

One file per modality, ``ckpt-NN.safetensors`` (NN = the modality's index), holding the
trainer's tensors (see :meth:`sdml_ext.engine.training.ModalityTrainer.state`) with the rest as JSON in
the safetensors header: nothing is pickled. A file is written under a temporary name in the same
directory, fsynced, renamed over the old one and the directory fsynced, so a reader (the next
run) finds either the previous checkpoint or the new one, whatever stopped the writer.

Cadence: at the end of an epoch once ``every_s`` seconds (default 60) have passed since the
modality's last checkpoint, and always after its last epoch (a finished modality is never
retrained). A stopped run therefore loses at most ``every_s`` plus one epoch of work per
modality. ``SDML_CHECKPOINT_EVERY`` (seconds; 0 = every epoch) overrides the default.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load, save

from .._testing.pause import pause_point
from ..store.files import fsync_dir, safetensors_metadata, write_atomic

DEFAULT_EVERY_S = 60.0
FORMAT = "sdml-checkpoint"
FORMAT_VERSION = 1


def default_every_s() -> float:
    """Seconds between checkpoints: ``SDML_CHECKPOINT_EVERY`` if set, else 60."""
    text = os.environ.get("SDML_CHECKPOINT_EVERY")
    if text is None:
        return DEFAULT_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"SDML_CHECKPOINT_EVERY must be a number of seconds >= 0, got {text!r}")
    return value


def fingerprint(task) -> dict:
    """What must match for a checkpoint to continue a task: the modality, its data's shapes and
    every option that shapes the training."""
    opts = task.options
    return {
        "name": task.name,
        "index": task.index,
        "train_shape": list(task.train_x.shape),
        "val_shape": list(task.val_x.shape),
        "classes": int(task.P.shape[1]),
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "lam": opts.lam,
        "lr": opts.lr_for(task.index),
        "betas": list(opts.betas),
        "seed": opts.seed_for(task.index),
        "model": opts.model_options(task.input_dim),
        "preprocess": opts.preprocess,
    }


@dataclass
class Checkpoints:
    """The checkpoints of one run, in `directory` (picklable: worker processes get a copy).

    every_s: seconds between a modality's checkpoints (see the module docstring).
    """

    directory: str
    every_s: float = field(default_factory=default_every_s)

    def __post_init__(self):
        self._last: dict[int, float] = {}

    def __getstate__(self):
        return {"directory": self.directory, "every_s": self.every_s}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._last = {}

    def path(self, index: int) -> Path:
        return Path(self.directory) / f"ckpt-{index:02d}.safetensors"

    def restore(self, trainer) -> bool:
        """Load `trainer`'s modality's checkpoint into it; False if there is none. Raises
        ValueError if the checkpoint belongs to another configuration or is unreadable."""
        self._last[trainer.task.index] = time.monotonic()
        path = self.path(trainer.task.index)
        if not path.exists():
            return False
        try:
            data = path.read_bytes()
            tensors = load(data)
            header = _header(data)
        except (OSError, SafetensorError, ValueError) as exc:
            raise ValueError(f"checkpoint {path} is unreadable ({exc}); remove it to retrain that modality") from None
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {path} is not a version-{FORMAT_VERSION} {FORMAT} file")
        expected = json.loads(json.dumps(fingerprint(trainer.task)))
        if header.get("task") != expected:
            raise ValueError(
                f"checkpoint {path} was written for another configuration of modality "
                f"{trainer.task.name!r} (saved {header.get('task')}, now {expected})"
            )
        trainer.restore(tensors, header["trainer"])
        return True

    def after_epoch(self, trainer) -> None:
        """Save if the cadence says so or the modality has just finished."""
        index = trainer.task.index
        last = self._last.setdefault(index, time.monotonic())
        finished = trainer.epoch >= trainer.task.options.epochs
        if finished or time.monotonic() - last >= self.every_s:
            self.save(trainer)
        pause_point(f"epoch:{trainer.task.name}:{trainer.epoch}")

    def save(self, trainer) -> Path:
        """Write `trainer`'s state atomically (see the module docstring)."""
        tensors, record = trainer.state()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": fingerprint(trainer.task),
            "trainer": record,
        }
        # JSON's Infinity/NaN (json's defaults) carry the loss history exactly: floats round-trip.
        data = save(tensors, metadata={"sdml": json.dumps(header)})
        path = self.path(trainer.task.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        self._last[trainer.task.index] = time.monotonic()
        return path

    def finished(self) -> list[int]:
        """Indices of modalities whose checkpoint is their last epoch (without loading weights)."""
        done = []
        for path in sorted(Path(self.directory).glob("ckpt-*.safetensors")):
            try:
                header = _header(path.read_bytes())
                if header["trainer"]["epoch"] >= header["task"]["epochs"]:
                    done.append(int(header["task"]["index"]))
            except (OSError, KeyError, ValueError, TypeError):
                continue
        return done

    def remove_stale_temporaries(self) -> None:
        """Temporary files of writers that were stopped mid-write (call while holding the run)."""
        directory = Path(self.directory)
        if directory.is_dir():
            for tmp in directory.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
            fsync_dir(directory)


def _header(data: bytes) -> dict:
    """The JSON record stored in a checkpoint's safetensors header."""
    meta = safetensors_metadata(data)
    if "sdml" not in meta:
        raise ValueError("no sdml record in the header")
    return json.loads(meta["sdml"])
