"""Evaluating a bundle on a split of a dataset: encode every modality, then the paper's mAP
tables (mAP@all and mAP@k for all ordered pairs, from :mod:`sdml_ext.metrics`) and the
precision-recall / precision@K curves, drawn to PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .bundle import Bundle
from .data import Dataset
from .metrics import CrossModalMAP, PairCurves, cross_modal_map, precision_at_k_curves, precision_recall_curves


@dataclass
class EncodedSplit:
    """Codes and labels of one split: codes[i] [n_i, d] float32, labels[i] [n_i] int64 class
    ids or [n_i, c] multi-hot rows, for modality names[i]."""

    split: str
    names: list[str]
    codes: list[Tensor]
    labels: list[Tensor]
    multilabel: bool


def encode_split(bundle: Bundle, dataset: Dataset, split: str = "test", modalities: Sequence[str] | None = None) -> EncodedSplit:
    """Encode `split` of every bundle modality the dataset has (or of `modalities`).

    Raises ValueError when the dataset's classes or a modality's width do not match the bundle,
    when fewer than two modalities remain, or when a split is empty.
    """
    if dataset.num_classes != len(bundle.class_names):
        raise ValueError(
            f"dataset {dataset.name!r} has {dataset.num_classes} classes but the bundle was trained "
            f"with {len(bundle.class_names)}"
        )
    if modalities is None:
        modalities = [n for n in bundle.modality_names if n in dataset.modality_names]
    codes, labels = [], []
    for name in modalities:
        data = dataset.modality(name).split(split)
        if data.n == 0:
            raise ValueError(f"modality {name!r} has no {split} samples to evaluate on")
        if data.dim != bundle.input_dim(name):
            raise ValueError(
                f"modality {name!r}: the dataset's features are {data.dim}-d but the bundle's network "
                f"takes {bundle.input_dim(name)}-d"
            )
        codes.append(bundle.encode(name, data.features))
        labels.append(torch.from_numpy(data.labels))
    if len(codes) < 2:
        raise ValueError(
            f"cross-modal evaluation needs two modalities present in both the bundle "
            f"({', '.join(bundle.modality_names)}) and the dataset ({', '.join(dataset.modality_names)})"
        )
    return EncodedSplit(split, list(modalities), codes, labels, dataset.multilabel)


def default_empty(multilabel: bool) -> str:
    """How queries with no relevant item count: 0 for single-label sets (the paper); left out
    of the mean for multi-label sets (the authors' MS-COCO code)."""
    return "skip" if multilabel else "zero"


@dataclass
class Evaluation:
    """mAP@all and mAP@k tables of one split."""

    encoded: EncodedSplit
    map_all: CrossModalMAP
    map_at_k: CrossModalMAP

    def format(self) -> str:
        return f"{self.map_all.format()}\n\n{self.map_at_k.format()}"

    def to_json(self) -> dict:
        """JSON-ready tables (diagonal and skipped pairs as null) keyed by metric."""

        def table(result: CrossModalMAP) -> dict:
            rows = [[None if math.isnan(v) else v for v in row] for row in result.table.tolist()]
            return {"k": result.k, "divisor": result.divisor, "empty": result.empty, "table": rows, "average": result.average}

        return {
            "split": self.encoded.split,
            "modalities": self.encoded.names,
            "queries": {n: int(c.shape[0]) for n, c in zip(self.encoded.names, self.encoded.codes)},
            "map_all": table(self.map_all),
            f"map_at_{self.map_at_k.k}": table(self.map_at_k),
        }


def evaluate(encoded: EncodedSplit, k: int = 50, empty: str | None = None) -> Evaluation:
    """The paper's tables for encoded codes; `empty` defaults to :func:`default_empty`."""
    empty = empty or default_empty(encoded.multilabel)
    common = {"names": encoded.names, "empty": empty}
    return Evaluation(
        encoded,
        cross_modal_map(encoded.codes, encoded.labels, None, **common),
        cross_modal_map(encoded.codes, encoded.labels, k, **common),
    )


def precision_scope(gallery_size: int) -> list[int]:
    """Cut-offs K of the precision@K curve: the paper's 100, 200, ..., 1000, or for a gallery
    smaller than 1000 ten even steps up to its size (K = 100 alone would leave a 400-item
    gallery with 4 points, all past the 40 relevant items of a class)."""
    if gallery_size >= 1000:
        return list(range(100, 1001, 100))
    return sorted({max(1, round(gallery_size * i / 10)) for i in range(1, 11)})


def curves(encoded: EncodedSplit, empty: str | None = None) -> tuple[PairCurves, PairCurves]:
    """(precision-recall curves, precision@K curves) for every ordered pair, K from
    :func:`precision_scope` of the smallest gallery."""
    empty = empty or default_empty(encoded.multilabel)
    ks = precision_scope(min(c.shape[0] for c in encoded.codes))
    pr = precision_recall_curves(encoded.codes, encoded.labels, names=encoded.names, empty=empty)
    pk = precision_at_k_curves(encoded.codes, encoded.labels, k=ks, names=encoded.names, empty=empty)
    return pr, pk


def plot_curves(pr: PairCurves, pk: PairCurves, out_dir: str | os.PathLike) -> list[Path]:
    """Draw the curves to ``precision_recall.png`` and ``precision_at_k.png`` in out_dir (one
    line per ordered pair); returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    from matplotlib import pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    for curves_, name, xlabel, title in (
        (pr, "precision_recall.png", "recall", "Precision-recall"),
        (pk, "precision_at_k.png", "K (top retrieved)", "Precision@K"),
    ):
        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        for (query, gallery), y in curves_.curves.items():
            ax.plot(curves_.x.numpy(), y.numpy(), marker=".", linewidth=1, label=f"{query}→{gallery}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(curves_.curves) > 10 else 1)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
