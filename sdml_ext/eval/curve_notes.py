"""What the curve figures say beside the curves: each pair's mAP@all, the numbers of queries and
gallery items, and K = the number of relevant gallery items per query (the class size for
single-label data), where precision@K must start to fall."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass
class CurveNotes:
    """maps[(query, gallery)]: mAP@all of the pair; items[name]: rows of the modality's split
    (its queries, and its gallery items when it is the gallery); relevant[(query, gallery)]: mean
    number of relevant gallery items per labelled query."""

    maps: dict[tuple[str, str], float]
    items: dict[str, int]
    relevant: dict[tuple[str, str], float]


def mean_relevant(query_labels: Tensor, gallery_labels: Tensor, block: int = 1024) -> float:
    """Mean over labelled queries of the gallery items sharing a label with the query (NaN when
    no query is labelled). Labels: [n] class ids (-1 = unlabelled) or [n, c] multi-hot rows."""
    q, g = query_labels.cpu().numpy(), gallery_labels.cpu().numpy()
    if q.ndim == 1:
        counts = np.bincount(g[g >= 0], minlength=int(max(q.max(initial=-1), g.max(initial=-1))) + 1)
        labelled = q[q >= 0]
        return float(counts[labelled].mean()) if labelled.size else float("nan")
    q, g = q[q.any(axis=1)].astype(np.float32), g.astype(np.float32)
    if not len(q):
        return float("nan")
    total = sum(int((q[i:i + block] @ g.T > 0).sum()) for i in range(0, len(q), block))  # blocks bound memory
    return total / len(q)


def curve_notes(evaluation) -> CurveNotes:
    """The notes of an :class:`sdml_ext.eval.evaluation.Evaluation` (its split's codes and mAP@all)."""
    encoded, table = evaluation.encoded, evaluation.map_all.table
    names = encoded.names
    maps, relevant = {}, {}
    for i, query in enumerate(names):
        for j, gallery in enumerate(names):
            if i != j:
                maps[(query, gallery)] = float(table[i][j])
                relevant[(query, gallery)] = mean_relevant(encoded.labels[i], encoded.labels[j])
    return CurveNotes(maps, {n: int(c.shape[0]) for n, c in zip(names, encoded.codes)}, relevant)
