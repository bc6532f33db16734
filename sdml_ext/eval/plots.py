"""Drawing evaluation curves (computed by :mod:`sdml_ext.eval.evaluation`) to PNG with matplotlib."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .metrics import PairCurves

# One style per gallery modality, the same in every panel: colour and marker and line style all
# differ, so curves stay apart in greyscale print and for colour-blind readers.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINESTYLES = ("-", "--", "-.", ":")


def _style(index: int) -> dict:
    return {
        "color": _COLOURS[index % len(_COLOURS)],
        "marker": _MARKERS[index % len(_MARKERS)],
        "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
    }


def _columns(panels: int) -> int:
    """Panels per row: 3 where that leaves at most one slot over (the legend takes it), else
    the width in 2..4 that leaves the fewest empty slots."""
    if panels <= 3:
        return panels
    return min((2, 3, 4), key=lambda c: ((-panels) % c, c != 3))


def draw_curves(pair_curves: PairCurves, kind: str, dataset: str, split: str, notes=None):
    """A matplotlib Figure with one panel per query modality and, in each, one curve per
    gallery modality (styled the same in every panel, one legend for the figure, which takes
    the grid's spare slot when there is one, so no panel is left empty).

    Args:
        pair_curves: curves of every ordered pair (query, gallery).
        kind: "pr" (interpolated precision against recall) or "pk" (precision@K, K on a log scale).
        dataset, split: named in the figure's title.
        notes: a :class:`sdml_ext.eval.curve_notes.CurveNotes`: then every panel's legend gives each
            curve's mAP@all and the gallery's size, its title the number of queries, and a P@K
            panel marks K = the mean number of relevant items per query (the class size).
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
    cols = _columns(len(queries))
    rows = math.ceil(len(queries) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 1.0), dpi=150, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).reshape(-1)
    x = pair_curves.x.numpy()
    for i, (ax, query) in enumerate(zip(axes, queries)):
        entries = []
        for index, gallery in enumerate(galleries):
            y = pair_curves.curves.get((query, gallery))
            if y is not None:
                (line,) = ax.plot(x, y.numpy(), linewidth=1.4, markersize=4, label=gallery, **_style(index))
                if notes is not None:
                    entries.append((line, f"{gallery} ({notes.items[gallery]} items): mAP@all "
                                          f"{notes.maps[(query, gallery)]:.3f}"))
        title = f"query: {query}"
        if notes is not None:
            title += f" ({notes.items[query]} queries)"
            relevant = [notes.relevant[(query, g)] for g in galleries if (query, g) in notes.relevant]
            relevant = [r for r in relevant if not math.isnan(r)]
            if kind == "pk" and relevant:
                r = float(np.mean(relevant))
                mark = ax.axvline(r, color="0.45", linestyle=":", linewidth=1.2)
                entries.append((mark, f"K = {r:.4g}: relevant items per query (class size)"))
            ax.legend(*zip(*entries), loc="lower left", fontsize=6.5, frameon=True, framealpha=0.8)
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3, which="both" if kind == "pk" else "major")
        ax.set_ylim(0, 1.02)
        if kind == "pk":
            ax.set_xscale("log")
            ax.set_xlim(1, max(x.max(), 1.5))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 10, 100, not 10^0 ...
        else:
            ax.set_xlim(0, 1)
        ax.tick_params(labelsize=9, labelbottom=True)  # every panel keeps its K / recall ticks
        ax.set_xlabel("K (top retrieved)" if kind == "pk" else "recall (precision interpolated)", fontsize=10)
        if i % cols == 0:
            ax.set_ylabel("precision", fontsize=10)
    spare = axes[len(queries):]
    for ax in spare:
        ax.set_visible(False)
    if kind == "pk":
        what = "Precision@K"
    else:  # the paper's curve: at recall r, the best precision at any recall >= r
        what = "Interpolated precision-recall (at recall r: the best precision at recall \u2265 r)"
    fig.suptitle(f"{what} on {dataset}, {split} split (cosine similarity)", fontsize=12)
    handles = [Line2D([], [], linewidth=1.4, markersize=5, **_style(i)) for i in range(len(galleries))]
    if len(spare):  # the legend fills the grid's spare slot
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, galleries, title="gallery modality", loc="center", fontsize=10, title_fontsize=10,
                        frameon=False)
    else:
        fig.legend(handles, galleries, title="gallery modality", loc="outside lower center",
                   ncol=min(len(galleries), 8), fontsize=10, title_fontsize=10, frameon=False)
    return fig


def plot_curves(pr: PairCurves, pk: PairCurves, out_dir: str | os.PathLike, *, dataset: str, split: str,
                notes=None) -> list[Path]:
    """Draw the curves (see :func:`draw_curves`) to ``precision_recall.png`` and
    ``precision_at_k.png`` in out_dir; returns the two paths."""
    out_dir = Path(out_dir)
    paths = []
    for pair_curves, kind, name in ((pr, "pr", "precision_recall.png"), (pk, "pk", "precision_at_k.png")):
        path = out_dir / name
        draw_curves(pair_curves, kind, dataset, split, notes).savefig(path)
        paths.append(path)
    return paths
