"""Readying a device before a run uses it: the one place that parses a device name, checks the
machine has it and, for CUDA, initialises it.

PyTorch initialises CUDA lazily, at the first tensor placed on a GPU. Some calls do not trigger
that initialisation themselves: ``torch.cuda.reset_peak_memory_stats("cuda:0")`` in a process that
has not yet touched the GPU raises "Invalid device argument", because the caching allocator has no
state for the device yet. Every path that puts work on a device (the training strategies, torchrun
ranks, ``sdml_ext.load`` and so evaluation and search) calls :func:`ready_device` first, so the
order in which a program touches the GPU never matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device: "cpu", "cuda" (the current CUDA device, made explicit as
    cuda:N) or "cuda:N". Raises ValueError naming the device when it is not one of those, when
    CUDA is not available, or when this machine has no GPU N."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return torch.device("cpu")
    if d.type != "cuda":
        raise ValueError(f"device {device!r}: only cpu and CUDA devices (cuda:N) are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(d)!r} requested but CUDA is not available here; use cpu")
    count = torch.cuda.device_count()
    index = d.index if d.index is not None else torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"no such CUDA device {str(d)!r}: this machine has {count}")
    return torch.device("cuda", index)


def ready_device(device: str | torch.device, *, reset_peak: bool = False) -> torch.device:
    """Parse and check `device` (see :func:`parse_device`) and make it usable: for CUDA,
    initialise PyTorch's CUDA state (the caching allocator of every device) and the device's
    context, then, with ``reset_peak``, reset its peak-memory statistics. Idempotent and cheap
    after the first call; returns the device with an explicit index (cuda:N)."""
    d = parse_device(device)
    if d.type == "cuda":
        torch.cuda.init()  # the allocator's per-device state: what reset_peak_memory_stats needs
        torch.cuda.synchronize(d)  # creates the device's context (a no-op once it exists)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(d)
    return d


def ready_devices(devices: Sequence[str | torch.device], *, reset_peak: bool = False) -> list[str]:
    """:func:`ready_device` for each of `devices`; their names ("cpu", "cuda:N"), in order."""
    return [str(ready_device(d, reset_peak=reset_peak)) for d in devices]
