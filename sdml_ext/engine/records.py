"""What training produces, as plain records: the losses of one epoch and a trained modality.

They live apart from the trainer so that readers of results (the bundle writer, progress bars,
the strategies' reports) need not import the training machinery.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class EpochStats:
    """Losses of one epoch: train_* are means over the epoch's batches, val_* over the whole
    validation split (val_sup over its labelled rows); val_* are NaN without validation data."""

    modality: str
    epoch: int
    train_loss: float
    train_rec: float
    train_sup: float
    val_loss: float
    val_rec: float
    val_sup: float
    best: bool


@dataclass
class ModalityResult:
    """A trained modality. ``state`` maps DSAE parameter names (plus ``preprocess.*``) to float32
    numpy arrays of the kept epoch (lowest validation supervised loss, or the last epoch when
    there is no labelled validation data: ``selection`` says which).

    time_s: wall seconds spent training this modality (steps, validation); cpu_s: CPU seconds of
    the training process meanwhile, all its threads (cpu_s / time_s = cores it got). Strategies
    set them to None where another modality shares the same moments (see strategies).
    state_bytes: see :meth:`sdml_ext.engine.training.ModalityTrainer.state_bytes`; peak_memory_bytes: the peak RSS of the
    worker process (parallel CPU) or the device's peak allocation (CUDA, one modality at a time).
    """

    name: str
    index: int
    model_options: dict
    preprocess: str
    lr: float
    seed: int
    state: dict[str, np.ndarray]
    best_epoch: int
    selection: str
    history: list[EpochStats]
    time_s: float | None
    cpu_s: float | None
    state_bytes: int
    peak_memory_bytes: int | None = None
    device: str = "cpu"

    def summary(self) -> dict:
        """JSON-ready description without the weights."""
        out = {k: v for k, v in asdict(self).items() if k not in ("state", "history")}
        out["history"] = [{k: v for k, v in asdict(s).items() if k != "modality"} for s in self.history]
        return out
