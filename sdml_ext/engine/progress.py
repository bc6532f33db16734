"""Progress bars for a training run: one tqdm bar per modality, fed from EpochStats.

Bars go to stderr and are drawn only on a terminal (tqdm's ``disable=None``); elsewhere, e.g.
in a log file, one line per finished modality is printed instead. A bar's clock stops when its
modality finishes (and, at the end, shows the modality's own training time where the run
measured it), so the bars redrawn at the end do not all show the whole run's time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from ..wording import plural
from .records import EpochStats


class _ModalityBar(tqdm):
    """A bar whose elapsed time can be frozen (``stopped``: seconds to show from then on)."""

    stopped: float | None = None

    @property
    def format_dict(self):
        d = super().format_dict
        if self.stopped is not None:
            d["elapsed"] = self.stopped
            d["rate"] = self.n / self.stopped if self.stopped > 0 else None
        return d


class EpochBars:
    """Callable ``bars(stats)``: advances modality ``stats.modality``'s bar by one epoch and shows
    the epoch's train loss and validation supervised loss. Use as a context manager."""

    def __init__(self, names: Sequence[str], epochs: int, file=None):
        self.file = file or sys.stderr
        self.epochs = epochs
        width = max(len(n) for n in names)
        self.bars = {
            name: _ModalityBar(total=epochs, desc=f"{name:<{width}}", position=i, unit="epoch", file=self.file, disable=None)
            for i, name in enumerate(names)
        }

    def __call__(self, stats: EpochStats) -> None:
        bar = self.bars[stats.modality]
        postfix = {"loss": f"{stats.train_loss:.4f}"}
        if not math.isnan(stats.val_sup):
            postfix["val_sup"] = f"{stats.val_sup:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if stats.epoch == self.epochs and not bar.disable:
            bar.stopped = bar.format_dict["elapsed"]
            bar.refresh()
        if bar.disable and stats.epoch == self.epochs:
            print(
                f"{stats.modality}: {plural(self.epochs, 'epoch')}, train loss {stats.train_loss:.4f}, "
                f"val sup {stats.val_sup:.4f}",
                file=self.file,
                flush=True,
            )

    def close(self, times: dict[str, float | None] | None = None) -> None:
        """Redraw every bar a last time and release the terminal lines. `times`: each modality's
        own training time in seconds (None where the run could not tell it apart), shown instead
        of the moment its last epoch ended."""
        for name, bar in self.bars.items():
            if not bar.disable and (times or {}).get(name) is not None:
                bar.stopped = times[name]
            bar.close()

    def __enter__(self) -> EpochBars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
