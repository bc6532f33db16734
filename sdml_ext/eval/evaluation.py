"""Evaluating a bundle on a split of a dataset: encode every modality, then the paper's mAP
tables (mAP@all and mAP@k for all ordered pairs, from :mod:`sdml_ext.metrics`) and the
precision-recall / precision@K curves (drawn to PNG by :mod:`sdml_ext.eval.plots`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data import Dataset
from ..store.bundle import Bundle
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


def encode_split(bundle: Bundle, dataset: Dataset, split: str = "test") -> EncodedSplit:
    """Encode `split` of every bundle modality the dataset has.

    Raises ValueError when the dataset's classes or a modality's width do not match the bundle,
    when fewer than two modalities remain, or when a split is empty.
    """
    if dataset.num_classes != len(bundle.class_names):
        raise ValueError(
            f"dataset {dataset.name!r} has {dataset.num_classes} classes but the bundle was trained "
            f"with {len(bundle.class_names)}"
        )
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


PAPER_KS = tuple(range(100, 1001, 100))
"""The paper's precision-scope cut-offs K = 100, 200, ..., 1000."""


def precision_scope(gallery_size: int, points: int = 24) -> list[int]:
    """Cut-offs K of the precision@K curve: about `points` K spread evenly on a log scale from 1
    to the gallery size, plus the paper's 100, 200, ..., 1000 where the gallery has them.

    K from 1 shows the head of the ranking, where the methods differ; a class with r relevant
    items caps precision@K at r/K for K > r, so a scope that starts at K = r or later shows
    little but that bound.
    """
    if gallery_size < 1:
        raise ValueError(f"gallery_size must be >= 1, got {gallery_size}")
    spread = np.geomspace(1, gallery_size, num=max(2, points))
    return sorted({int(round(k)) for k in spread} | {k for k in PAPER_KS if k <= gallery_size})


def curves(encoded: EncodedSplit, empty: str | None = None) -> tuple[PairCurves, PairCurves]:
    """(precision-recall curves, precision@K curves) for every ordered pair, K from
    :func:`precision_scope` of the smallest gallery."""
    empty = empty or default_empty(encoded.multilabel)
    ks = precision_scope(min(c.shape[0] for c in encoded.codes))
    pr = precision_recall_curves(encoded.codes, encoded.labels, names=encoded.names, empty=empty)
    pk = precision_at_k_curves(encoded.codes, encoded.labels, k=ks, names=encoded.names, empty=empty)
    return pr, pk


# One style per gallery modality, the same in every panel: colour and marker and line style all
# differ, so curves stay apart in greyscale print and for colour-blind readers.
