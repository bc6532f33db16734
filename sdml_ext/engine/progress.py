"""Progress bars for a training run: one tqdm bar per modality, fed from EpochStats.

Bars go to stderr and are drawn only on a terminal (tqdm's ``disable=None``); elsewhere, e.g.
in a log file, one line per finished modality is printed instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from .records import EpochStats


class EpochBars:
    """Callable ``bars(stats)``: advances modality ``stats.modality``'s bar by one epoch and shows
    the epoch's train loss and validation supervised loss. Use as a context manager."""

    def __init__(self, names: Sequence[str], epochs: int, file=None):
        self.file = file or sys.stderr
        self.epochs = epochs
        width = max(len(n) for n in names)
        self.bars = {
            name: tqdm(total=epochs, desc=f"{name:<{width}}", position=i, unit="epoch", file=self.file, disable=None)
            for i, name in enumerate(names)
        }

    def __call__(self, stats: EpochStats) -> None:
        bar = self.bars[stats.modality]
        postfix = {"loss": f"{stats.train_loss:.4f}"}
        if not math.isnan(stats.val_sup):
            postfix["val_sup"] = f"{stats.val_sup:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if bar.disable and stats.epoch == self.epochs:
            print(
                f"{stats.modality}: {self.epochs} epochs, train loss {stats.train_loss:.4f}, "
                f"val sup {stats.val_sup:.4f}",
                file=self.file,
                flush=True,
            )

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def __enter__(self) -> EpochBars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
