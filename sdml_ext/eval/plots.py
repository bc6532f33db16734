"""Drawing evaluation curves (computed by :mod:`sdml_ext.eval.evaluation`) to PNG with matplotlib."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .metrics import PairCurves

_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINESTYLES = ("-", "--", "-.", ":")


def _style(index: int) -> dict:
    return {
        "color": _COLOURS[index % len(_COLOURS)],
        "marker": _MARKERS[index % len(_MARKERS)],
        "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
    }


def draw_curves(pair_curves: PairCurves, kind: str, dataset: str, split: str):
    """A matplotlib Figure with one panel per query modality and, in each, one curve per
    gallery modality (styled the same in every panel, one legend for the figure).

    Args:
        pair_curves: curves of every ordered pair (query, gallery).
        kind: "pr" (precision against recall) or "pk" (precision@K, K on a log scale).
        dataset, split: named in the figure's title.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    if kind not in ("pr", "pk"):
        raise ValueError(f"kind must be 'pr' or 'pk', got {kind!r}")
    queries = list(dict.fromkeys(q for q, _ in pair_curves.curves))
    names = list(dict.fromkeys(n for pair in pair_curves.curves for n in pair))  # the modalities' order
    galleries = [n for n in names if any(g == n for _, g in pair_curves.curves)]
    if not queries:
        raise ValueError("no curves to draw")
    cols = min(3, len(queries))
    rows = math.ceil(len(queries) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 1.0), dpi=150, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).reshape(-1)
    x = pair_curves.x.numpy()
    for i, (ax, query) in enumerate(zip(axes, queries)):
        for index, gallery in enumerate(galleries):
            y = pair_curves.curves.get((query, gallery))
            if y is not None:
                ax.plot(x, y.numpy(), linewidth=1.4, markersize=4, label=gallery, **_style(index))
        ax.set_title(f"query: {query}", fontsize=11)
        ax.grid(alpha=0.3, which="both" if kind == "pk" else "major")
        ax.set_ylim(0, 1.02)
        if kind == "pk":
            ax.set_xscale("log")
            ax.set_xlim(1, max(x.max(), 1.5))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 10, 100, not 10^0 ...
        else:
            ax.set_xlim(0, 1)
        ax.tick_params(labelsize=9, labelbottom=True)  # every panel keeps its K / recall ticks
        ax.set_xlabel("K (top retrieved)" if kind == "pk" else "recall", fontsize=10)
        if i % cols == 0:
            ax.set_ylabel("precision", fontsize=10)
    for ax in axes[len(queries):]:
        ax.set_visible(False)
    what = "Precision@K" if kind == "pk" else "Precision-recall"
    fig.suptitle(f"{what} on {dataset}, {split} split (cosine similarity)", fontsize=13)
    handles = [Line2D([], [], linewidth=1.4, markersize=5, **_style(i)) for i in range(len(galleries))]
    fig.legend(handles, galleries, title="gallery modality", loc="outside lower center", ncol=min(len(galleries), 8),
               fontsize=10, title_fontsize=10, frameon=False)
    return fig


def plot_curves(pr: PairCurves, pk: PairCurves, out_dir: str | os.PathLike, *, dataset: str, split: str) -> list[Path]:
    """Draw the curves (see :func:`draw_curves`) to ``precision_recall.png`` and
    ``precision_at_k.png`` in out_dir; returns the two paths."""
    out_dir = Path(out_dir)
    paths = []
    for pair_curves, kind, name in ((pr, "pr", "precision_recall.png"), (pk, "pk", "precision_at_k.png")):
        path = out_dir / name
        draw_curves(pair_curves, kind, dataset, split).savefig(path)
        paths.append(path)
    return paths
