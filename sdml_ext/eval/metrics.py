"""Cross-modal retrieval evaluation as the paper reports it, built on :mod:`sdml_ext.ops.retrieval`.

For m modalities, every ordered pair (query modality q, gallery modality g), q != g, ranks the whole
gallery of g for each query of q by cosine similarity; the paper's table lists the m(m-1) mAPs and
their average. Both directions of a modality pair come from one similarity computation (the scores
of g's queries against q are the transpose of q's against g) where the pair's score matrix fits
``pair_memory_bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..ops.retrieval import (
    DEFAULT_KS,
    DEFAULT_RECALL_LEVELS,
    Cutoffs,
    average_precision,
    average_precision_pair,
    precision_at_k,
    precision_recall_curve,
)

__all__ = [
    "CrossModalMAP",
    "PairCurves",
    "cross_modal_map",
    "mean_over_queries",
    "mean_average_precision",
    "precision_at_k_curves",
    "precision_recall_curves",
]


def mean_over_queries(values: Tensor) -> Tensor:
    """Mean over dim 0 of per-query values, leaving out NaN (skipped) queries.

    [Nq] -> 0-d, [Nq, L] -> [L], float64. NaN where every query was skipped.
    """
    return torch.nanmean(values.double(), dim=0)


def mean_average_precision(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    k: int | None = None,
    *,
    divisor: str = "retrieved",
    empty: str = "zero",
    exclude_self: bool = False,
) -> float:
    """mAP@k of one query set against one gallery (arguments as in
    :func:`sdml_ext.ops.average_precision`); skipped queries are left out of the mean."""
    ap = average_precision(query, gallery, query_labels, gallery_labels, k, divisor=divisor, empty=empty,
                           exclude_self=exclude_self)
    return float(mean_over_queries(ap))


def _check_modalities(embeddings: Sequence[Tensor], labels: Sequence[Tensor], names: Sequence[str] | None) -> list[str]:
    m = len(embeddings)
    if len(labels) != m:
        raise ValueError(f"labels: expected one label tensor per modality ({m}), got {len(labels)}")
    if m < 2:
        raise ValueError(f"embeddings: cross-modal retrieval needs at least 2 modalities, got {m}")
    if names is None:
        return [f"modality {i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"names: expected one name per modality ({m}), got {len(names)}")
    return [str(n) for n in names]


def _pairs(m: int):
    return [(q, g) for q in range(m) for g in range(m) if q != g]


#: Largest [n_g, n_q] score matrix cross_modal_map holds to get both directions of a pair from one
#: GEMM; larger pairs take one GEMM per direction (memory: one tile of rows per thread). Measured on
#: 2 cores (benchmarks/RESULTS.md): at 8,000² (256 MB) the pair took 0.80 CPU-s against 1.07 for
#: two calls; at 23,661² (2.2 GB, past the kernels' 1 GiB buffer cache, so every call faults in
#: fresh pages and transposes into them) it took longer than two calls.
PAIR_MEMORY_BYTES = 1 << 30


@dataclass
class CrossModalMAP:
    """The paper's mAP table.

    table: [m, m] float64, ``table[q, g]`` = mAP of modality q's queries against modality g's
        gallery; the diagonal is NaN (no same-modality retrieval).
    average: mean over the m(m-1) ordered pairs.
    names: modality names; k, divisor, empty: the options used.
    """

    table: Tensor
    average: float
    names: list[str]
    k: int | None = None
    divisor: str = "retrieved"
    empty: str = "zero"

    def pair(self, query: str, gallery: str) -> float:
        """mAP of one ordered pair, by modality names."""
        return float(self.table[self.names.index(query), self.names.index(gallery)])

    def format(self, names: Sequence[str] | None = None, digits: int = 3) -> str:
        """The table as text: rows are query modalities, columns gallery modalities, then the average."""
        names = list(self.names if names is None else names)
        if len(names) != len(self.names):
            raise ValueError(f"names: expected {len(self.names)} names, got {len(names)}")
        cutoff = "all" if self.k is None else str(self.k)
        width = max(max(len(n) for n in names), digits + 2, 5)
        head = "query \\ gallery"
        lines = [f"mAP@{cutoff} (divisor={self.divisor}, empty={self.empty})"]
        lines.append(head.ljust(max(len(head), width)) + "".join(f"  {n:>{width}}" for n in names))
        for q, qn in enumerate(names):
            cells = []
            for g in range(len(names)):
                v = float(self.table[q, g])
                cells.append(f"  {'-' if q == g else ('nan' if math.isnan(v) else f'{v:.{digits}f}'):>{width}}")
            lines.append(qn.ljust(max(len(head), width)) + "".join(cells))
        n_pairs = len(names) * (len(names) - 1)
        lines.append(f"average over {n_pairs} pairs: {self.average:.{digits}f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def cross_modal_map(
    embeddings: Sequence[Tensor],
    labels: Sequence[Tensor],
    k: int | None = None,
    names: Sequence[str] | None = None,
    divisor: str = "retrieved",
    empty: str = "zero",
    pair_memory_bytes: int = PAIR_MEMORY_BYTES,
) -> CrossModalMAP:
    """mAP@k for every ordered pair of modalities and their average (the paper's table).

    Args:
        embeddings: m tensors, ``embeddings[i]`` [n_i, d] floating (one d, dtype and device).
        labels: m tensors, ``labels[i]`` [n_i] int64 class ids (-1 = unlabelled) or [n_i, c]
            multi-hot rows (all modalities in the same form).
        k: rank cut-off; None = all items (the paper's mAP@all), 50 = the authors' second figure.
        names: modality names for the printed table (default "modality 0", ...).
        divisor, empty: see :func:`sdml_ext.ops.average_precision`. Skipped queries are left out
            of each pair's mean.
        pair_memory_bytes: both directions of a pair come from one GEMM
            (:func:`sdml_ext.ops.average_precision_pair`) when its n_q x n_g scores fit in this many
            bytes; otherwise each direction is computed on its own.
    """
    names = _check_modalities(embeddings, labels, names)
    m = len(embeddings)
    table = torch.full((m, m), float("nan"), dtype=torch.float64)
    for q in range(m):
        for g in range(q + 1, m):
            a, b = embeddings[q], embeddings[g]
            if a.shape[0] * b.shape[0] * a.element_size() <= pair_memory_bytes and a.shape[0] > 0:
                a_to_b, b_to_a = average_precision_pair(a, b, labels[q], labels[g], k, divisor=divisor, empty=empty)
                table[q, g], table[g, q] = float(mean_over_queries(a_to_b)), float(mean_over_queries(b_to_a))
                continue
            for x, y in ((q, g), (g, q)):
                table[x, y] = mean_average_precision(
                    embeddings[x], embeddings[y], labels[x], labels[y], k, divisor=divisor, empty=empty
                )
    off_diagonal = table[~torch.eye(m, dtype=torch.bool)]
    return CrossModalMAP(table, float(off_diagonal.mean()), names, k, divisor, empty)


@dataclass
class PairCurves:
    """One curve per ordered pair of modalities, for plotting.

    x: the abscissa (cut-offs K or recall levels), float64 [L].
    curves: ``curves[(query name, gallery name)]`` = float64 [L], averaged over queries.
    """

    x: Tensor
    curves: dict[tuple[str, str], Tensor] = field(default_factory=dict)


def precision_at_k_curves(
    embeddings: Sequence[Tensor],
    labels: Sequence[Tensor],
    k: Sequence[int] = DEFAULT_KS,
    names: Sequence[str] | None = None,
    empty: str = "zero",
) -> PairCurves:
    """Precision@K at each cut-off K in k (the paper's precision-scope curve, K = 100, ..., 1000)
    for every ordered pair."""
    names = _check_modalities(embeddings, labels, names)
    k = [int(K) for K in k]
    out = PairCurves(torch.tensor([float(K) for K in k], dtype=torch.float64))
    for q, g in _pairs(len(names)):
        per_query = precision_at_k(embeddings[q], embeddings[g], labels[q], labels[g], k, empty=empty)
        out.curves[(names[q], names[g])] = mean_over_queries(per_query).cpu()
    return out


def precision_recall_curves(
    embeddings: Sequence[Tensor],
    labels: Sequence[Tensor],
    recall_levels: Sequence[float] = DEFAULT_RECALL_LEVELS,
    names: Sequence[str] | None = None,
    empty: str = "zero",
) -> PairCurves:
    """Interpolated precision at each recall level (default 0, 0.1, ..., 1) for every ordered pair."""
    names = _check_modalities(embeddings, labels, names)
    out = PairCurves(torch.tensor([float(L) for L in recall_levels], dtype=torch.float64))
    for q, g in _pairs(len(names)):
        per_query = precision_recall_curve(embeddings[q], embeddings[g], labels[q], labels[g], recall_levels,
                                           empty=empty)
        out.curves[(names[q], names[g])] = mean_over_queries(per_query).cpu()
    return out
