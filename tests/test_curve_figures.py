"""The curve figures a paper reader needs: each curve's mAP@all in its panel's legend, the
numbers of queries and gallery items, K = the class size marked on P@K, an interpolated PR
curve said to be one, and no empty panel (five modalities: the legend takes the sixth slot)."""

import numpy as np
import torch

from sdml_ext.eval.curve_notes import CurveNotes, mean_relevant
from sdml_ext.eval.plots import _columns, draw_curves
from sdml_ext.metrics import PairCurves

NAMES = ["fou", "kar", "mor", "pix", "zer"]


def notes() -> CurveNotes:
    pairs = [(q, g) for q in NAMES for g in NAMES if q != g]
    return CurveNotes({p: 0.5 + 0.01 * i for i, p in enumerate(pairs)}, {n: 400 + i for i, n in enumerate(NAMES)},
                      {p: 40.0 for p in pairs})


def test_five_modalities_fill_the_grid_and_every_panel_is_annotated():
    pairs = [(q, g) for q in NAMES for g in NAMES if q != g]
    pk = PairCurves(torch.tensor([1.0, 10, 40, 100, 400], dtype=torch.float64),
                    {p: torch.linspace(1, 0.1, 5, dtype=torch.float64) for p in pairs})
    fig = draw_curves(pk, "pk", "mfeat", "test", notes())
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6 and not fig.legends  # five panels and the legend in the sixth slot
    panels, legend_slot = visible[:5], visible[5]
    assert not legend_slot.get_lines() and [t.get_text() for t in legend_slot.get_legend().get_texts()] == NAMES
    for i, (ax, query) in enumerate(zip(panels, NAMES)):
        assert ax.get_title() == f"query: {query} ({400 + i} queries)"
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        galleries = [g for g in NAMES if g != query]
        expected = [f"{g} ({400 + NAMES.index(g)} items): mAP@all {notes().maps[(query, g)]:.3f}" for g in galleries]
        assert texts == expected + ["K = 40: relevant items per query (class size)"]
        marks = [ln for ln in ax.get_lines() if ln.get_label() not in galleries]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [40, 40]  # the vertical line at K = 40
    pr = PairCurves(torch.linspace(0, 1, 11, dtype=torch.float64), {p: torch.ones(11, dtype=torch.float64) for p in pairs})
    fig = draw_curves(pr, "pr", "mfeat", "test", notes())
    assert "Interpolated precision-recall" in fig._suptitle.get_text()
    assert all("interpolated" in ax.get_xlabel() for ax in fig.axes[:5])
    assert all(len(ax.get_lines()) == 4 for ax in fig.axes[:5])  # no K mark on a PR panel


def test_grid_widths_leave_at_most_one_slot_for_the_legend():
    for n in range(1, 13):
        cols = _columns(n)
        assert 1 <= cols <= 4 and (-n) % cols <= 1, (n, cols)
    assert [_columns(n) for n in (2, 3, 5, 6, 9)] == [2, 3, 3, 3, 3]


def test_mean_relevant_matches_counting():
    rng = np.random.default_rng(0)
    q, g = rng.integers(-1, 4, 50), rng.integers(-1, 4, 70)
    brute = np.mean([(g == y).sum() for y in q if y >= 0])
    assert mean_relevant(torch.from_numpy(q), torch.from_numpy(g)) == brute
    qm, gm = rng.random((30, 5)) < 0.3, rng.random((60, 5)) < 0.3
    brute = np.mean([(gm[:, row].any(axis=1)).sum() for row in qm if row.any()])
    assert np.isclose(mean_relevant(torch.from_numpy(qm), torch.from_numpy(gm), block=7), brute)
    assert np.isnan(mean_relevant(torch.tensor([-1, -1]), torch.tensor([0, 1])))
