"""What a checkpoint file must be before anything in it is restored: its tensors match, name for
name, shape for shape and dtype for dtype, the network and optimizer they go into (a wrong
shape would otherwise reach the fused Adam kernel, which trusts its buffers' sizes); its tensor
bytes match the checksum written with them; its JSON record has every field, of the right type
and range; and the data it was trained on is the data it continues on. Every failure is one
ValueError line naming the file and the field."""

from __future__ import annotations

import hashlib
import math
import os
import stat

import numpy as np
import torch

from ..errors import UnsafePathError

HEADER_LIMIT = 1 << 26  # a checkpoint's JSON header (its loss history included) stays far below
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATS_FIELDS = ("modality", "epoch", "train_loss", "train_rec", "train_sup", "val_loss", "val_rec", "val_sup", "best")


class CheckpointInvalid(ValueError):
    """A checkpoint that is not what the run wrote (a ValueError: one line for the user)."""

    def __init__(self, path, field: str, problem: str):
        super().__init__(f"checkpoint {path}: {field} {problem}; remove it to retrain that modality")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_sha256(task) -> str:
    """The identity of the data a modality trains on: sha256 of its train/validation arrays
    (float32 features, labels as stored) and of P. Cheap next to an epoch: one pass over the data."""
    digest = hashlib.sha256()
    for array in (task.train_x, task.train_y, task.val_x, task.val_y):
        a = np.ascontiguousarray(array)
        digest.update(f"{a.dtype}:{a.shape}:".encode())
        digest.update(memoryview(a).cast("B") if a.size else b"")
    P = task.P.detach().cpu().contiguous().float()
    digest.update(f"P:{tuple(P.shape)}:".encode())
    digest.update(P.numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint_bytes(path, max_bytes: int | None = None, header_only: bool = False) -> bytes:
    """The bytes of the checkpoint file `path`: a regular file (a FIFO, a device or a link to
    one is refused without blocking) of at most `max_bytes`, whose header length fits in the
    file and is bounded, read only up to the size the file has (header_only: only its length
    prefix and JSON header)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"checkpoint {path} is not a regular file; refusing to read it")
        if max_bytes is not None and st.st_size > max_bytes:
            raise CheckpointInvalid(path, "the file", f"is {st.st_size} bytes, more than the {max_bytes} its tensors take")
        os.set_blocking(fd, True)
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or n > HEADER_LIMIT or 8 + n > st.st_size:
            declared = "no" if n is None else f"{n} bytes of"
            raise CheckpointInvalid(path, "is unreadable", f"(truncated: the header declares {declared} JSON, "
                                                           f"the file has {st.st_size} bytes)")
        chunks, offset, end = [], 0, 8 + n if header_only else st.st_size
        while offset < end:
            chunk = os.pread(fd, min(end - offset, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def expected_tensors(trainer) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the tensors a checkpoint of `trainer` holds (Adam moments and
    kept weights listed; whether they are present is checked by :func:`check_tensors`)."""
    spec = {}
    state = trainer.model.state_dict()
    for k, v in state.items():
        spec[f"model.{k}"] = (tuple(v.shape), v.dtype)
        spec[f"best.{k}"] = (tuple(v.shape), v.dtype)
    for i, p in enumerate(trainer.model.parameters()):
        for moment in _ADAM_MOMENTS:
            spec[f"adam.{i}.{moment}"] = (tuple(p.shape), p.dtype)
        spec[f"adam.{i}.step"] = ((), None)  # a scalar; its float dtype depends on the Adam variant
    rng = trainer.shuffle.get_state()
    spec["rng.shuffle"] = (tuple(rng.shape), rng.dtype)
    return spec


def max_file_bytes(trainer) -> int:
    """The most bytes a checkpoint of `trainer` can take: all its tensors and the bounded header."""
    total = 8 + HEADER_LIMIT
    for shape, dtype in expected_tensors(trainer).values():
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None else 8
        total += math.prod(shape) * size
    return total


def check_tensors(path, tensors: dict[str, torch.Tensor], trainer) -> None:
    """Every tensor of the checkpoint is one `trainer` has, of its shape and dtype; the network,
    the generator state and, for every parameter, Adam's moments and step are all present."""
    spec = expected_tensors(trainer)
    for name, t in tensors.items():
        if name not in spec:
            raise CheckpointInvalid(path, f"tensor {name!r}", "is not part of this modality's trainer")
        shape, dtype = spec[name]
        if name.endswith(".step"):
            if t.numel() != 1 or not t.dtype.is_floating_point and t.dtype not in (torch.int64, torch.int32):
                raise CheckpointInvalid(path, f"tensor {name!r}", f"must be one number, got {t.dtype} {tuple(t.shape)}")
            continue
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointInvalid(path, f"tensor {name!r}",
                                    f"is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    names = set(tensors)
    for group in ("model.", "best."):
        wanted = {n for n in spec if n.startswith(group)}
        if group == "model." or names & wanted:
            missing = sorted(wanted - names)
            if missing:
                raise CheckpointInvalid(path, f"tensor {missing[0]!r}", "is missing")
    if "rng.shuffle" not in names:
        raise CheckpointInvalid(path, "tensor 'rng.shuffle'", "is missing")
    adam = {n for n in names if n.startswith("adam.")}
    if adam:
        for i, _ in enumerate(trainer.model.parameters()):
            for part in ("exp_avg", "exp_avg_sq", "step"):
                if f"adam.{i}.{part}" not in adam:
                    raise CheckpointInvalid(path, f"tensor 'adam.{i}.{part}'", "is missing")


def _number(value, allow_none=False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_record(path, record, epochs: int) -> None:
    """The JSON record of a checkpoint (see ModalityTrainer.state): every field present, of its
    type, epochs within the run's, the kept epoch not after the last one."""
    if not isinstance(record, dict):
        raise CheckpointInvalid(path, "trainer", "is not a JSON object")
    for key in ("epoch", "best_epoch", "best_loss", "history", "busy_s", "cpu_s"):
        if key not in record:
            raise CheckpointInvalid(path, f"trainer.{key}", "is missing")
    epoch, best = record["epoch"], record["best_epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= epochs:
        raise CheckpointInvalid(path, "trainer.epoch", f"must be an integer in [0, {epochs}], got {epoch!r}")
    if not isinstance(best, int) or isinstance(best, bool) or not 0 <= best <= epoch:
        raise CheckpointInvalid(path, "trainer.best_epoch", f"must be an integer in [0, epoch={epoch}], got {best!r}")
    if not _number(record["best_loss"], allow_none=True) or (record["best_loss"] is not None and math.isnan(record["best_loss"])):
        raise CheckpointInvalid(path, "trainer.best_loss", f"must be a number, got {record['best_loss']!r}")
    for key in ("busy_s", "cpu_s"):
        if not _number(record[key]) or not record[key] >= 0:
            raise CheckpointInvalid(path, f"trainer.{key}", f"must be a number of seconds >= 0, got {record[key]!r}")
    history = record["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise CheckpointInvalid(path, "trainer.history", f"must list one entry per epoch ({epoch})")
    for j, entry in enumerate(history):
        if not isinstance(entry, dict) or set(entry) != set(_STATS_FIELDS):
            raise CheckpointInvalid(path, f"trainer.history[{j}]", f"must have exactly the fields {', '.join(_STATS_FIELDS)}")
        if entry["epoch"] != j + 1 or not isinstance(entry["modality"], str) or not isinstance(entry["best"], bool):
            raise CheckpointInvalid(path, f"trainer.history[{j}]", "is not the record of epoch " + str(j + 1))
        for key in _STATS_FIELDS[2:8]:
            if not _number(entry[key], allow_none=True):
                raise CheckpointInvalid(path, f"trainer.history[{j}].{key}", f"must be a number, got {entry[key]!r}")
