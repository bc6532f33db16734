"""The quality of a search's hits: P@k and mAP@k of queries whose labels are known, computed by
the retrieval kernels (:func:`sdml_ext.ops.average_precision`, :func:`sdml_ext.ops.precision_at_k`)
from the hit lists alone, so a streamed gallery is scored without reading it whole."""

from __future__ import annotations

import math

import torch

from ..ops.retrieval import TopK, average_precision, precision_at_k
from .checks import check_labels

#: Elements of the one-hot query/gallery codes a block of queries is scored with (below).
_BLOCK_ELEMENTS = 1 << 22


def hit_quality(index, top: TopK, query_labels) -> dict:
    """P@k and mAP@k of queries from their top-k rows and labels (gallery labels from the index).

    Relevant means the same class id (>= 0) or, for multi-hot rows, a shared class. AP@k divides
    by the relevant items within k and a query without any scores 0: the defaults of
    :func:`sdml_ext.ops.average_precision`, which computes them here, and which gives the same
    values ranking a whole in-memory gallery.

    Each query's hit list becomes its own small gallery: a block of B queries gets B one-hot
    codes, and query i's k hits the code of query i, in rank order, so every query ranks its own
    hits first (cosine 1 against 0 for the others), in their order (equal scores rank by gallery
    position), and the kernels see exactly the hit lists.

    Args:
        index: the :class:`~sdml_ext.search.SearchIndex` searched (its labels_of gives the hits' labels).
        top: TopK of :meth:`SearchIndex.search_codes`, indices [nq, k].
        query_labels: [nq] class ids or [nq, c] multi-hot rows, the kind the index's labels are.
    Returns: {"k", "queries", "precision_at_k", "map_at_k"}.
    """
    nq, k = top.indices.shape
    if nq == 0:
        raise ValueError("no queries to score")
    kind, ql = check_labels(query_labels, nq)
    if kind != index.label_kind:
        raise ValueError(f"query labels are {kind} but the index's gallery labels are {index.label_kind}")
    gl = index.labels_of(top.indices)  # [nq, k] or [nq, k, c]
    ql = torch.from_numpy(ql)
    if kind == "multi_hot" and gl.shape[-1] != ql.shape[1]:
        raise ValueError(f"query labels have {ql.shape[1]} classes, the index's {gl.shape[-1]}")
    block = max(1, min(nq, math.isqrt(_BLOCK_ELEMENTS // k)))
    ap, precision = [], []
    for start in range(0, nq, block):
        b = min(block, nq - start)
        queries = torch.eye(b)
        gallery = queries.repeat_interleave(k, dim=0)  # [b * k, b]: query i's hits, in rank order
        labels = gl[start:start + b].flatten(0, 1)
        ap.append(average_precision(queries, gallery, ql[start:start + b], labels, k))
        precision.append(precision_at_k(queries, gallery, ql[start:start + b], labels, k))
    return {"k": k, "queries": nq, "precision_at_k": float(torch.cat(precision).mean()),
            "map_at_k": float(torch.cat(ap).mean())}
