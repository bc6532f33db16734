"""Retrieval ops: cosine top-k and ranking metrics (AP, precision@K, precision-recall).

Schemas are declared in ``python/registration_retrieval.cpp``; kernels live in ``csrc/``. Every op
ranks the gallery for each query by descending cosine similarity, equal scores by ascending
gallery index, without ever holding the full [Nq, Ng] similarity matrix. Inputs need not be
normalized. The metric ops return per-query values (float64); NaN marks a query left out under
``empty="skip"`` (see :mod:`sdml_ext.metrics` for the means and the cross-modal table).

Labels are class ids ``[N]`` (any integer dtype, -1 = unlabelled) — relevant means the same class —
or multi-hot rows ``[N, c]`` (any numeric dtype, non-zero = has the class) — relevant means sharing
a class. An unlabelled / all-zero query has no relevant item; an unlabelled gallery item is
relevant to nothing.

None of these ops is differentiable (rankings are piecewise constant).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels and their schemas)

#: The paper's precision-scope cut-offs.
DEFAULT_KS = tuple(range(100, 1001, 100))
#: The 11 standard recall levels 0, 0.1, ..., 1.
DEFAULT_RECALL_LEVELS = tuple(i / 10 for i in range(11))


class TopK(NamedTuple):
    """What :func:`cosine_topk` returns: scores [Nq, k] (input dtype), indices [Nq, k] int64."""

    scores: Tensor
    indices: Tensor


def cosine_topk(query: Tensor, gallery: Tensor, k: int, *, exclude_self: bool = False) -> TopK:
    """The k gallery items most cosine-similar to each query, best first.

    Args:
        query: [Nq, d] floating embeddings (float32/float64 on CPU; also float16/bfloat16 on CUDA).
        gallery: [Ng, d], same dtype and device.
        k: 1 <= k <= Ng (Ng - 1 under ``exclude_self``).
        exclude_self: query i and gallery item i are the same sample (same-modality retrieval,
            Nq == Ng): item i is never returned for query i.

    Equal scores are ordered by ascending gallery index.
    """
    return TopK(*torch.ops.sdml.cosine_topk.default(query, gallery, int(k), bool(exclude_self)))


def average_precision(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    k: int | None = None,
    *,
    divisor: str = "retrieved",
    empty: str = "zero",
    exclude_self: bool = False,
) -> Tensor:
    """Per-query AP@k, [Nq] float64.

    ``AP@k = (1/D) * sum_{j<=k} rel_j * precision@j``.

    Args:
        query, gallery: [Nq, d] and [Ng, d] embeddings (see :func:`cosine_topk`).
        query_labels, gallery_labels: [Nq] / [Ng] class ids or [Nq, c] / [Ng, c] multi-hot rows.
        k: rank cut-off; None = all ranked items (the paper's mAP@all). A k beyond the gallery
            size means all items.
        divisor: ``"retrieved"`` — D = relevant items within k (the authors' rule, default);
            ``"relevant"`` — D = all relevant items in the gallery (the TREC rule).
        empty: a query with no relevant item within k scores 0 (``"zero"``, default) or NaN
            (``"skip"``, the authors' multi-label code: means leave it out).
        exclude_self: see :func:`cosine_topk`.
    """
    return torch.ops.sdml.average_precision.default(
        query, gallery, query_labels, gallery_labels, None if k is None else int(k), divisor, empty,
        bool(exclude_self),
    )


def precision_at_k(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    empty: str = "zero",
    exclude_self: bool = False,
) -> Tensor:
    """Per-query precision within the top K, [Nq, len(ks)] float64 (the precision-scope curve).

    P@K = (relevant items among the top K) / min(K, items ranked). A query with no relevant item
    in the whole gallery gets 0 (``empty="zero"``) or NaN (``"skip"``). Other arguments as in
    :func:`average_precision`.
    """
    return torch.ops.sdml.precision_at_k.default(
        query, gallery, query_labels, gallery_labels, [int(K) for K in ks], empty, bool(exclude_self)
    )


def precision_recall_curve(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    recall_levels: Sequence[float] = DEFAULT_RECALL_LEVELS,
    *,
    empty: str = "zero",
    exclude_self: bool = False,
) -> Tensor:
    """Per-query interpolated precision at each recall level, [Nq, len(recall_levels)] float64.

    With R relevant items in the gallery and the h-th of them at rank p_h, the precision at
    level L is ``max over h with h / R >= L of h / p_h`` (levels in [0, 1]). A query with no
    relevant item gets 0 (``empty="zero"``) or NaN (``"skip"``). Other arguments as in
    :func:`average_precision`.
    """
    return torch.ops.sdml.precision_recall_curve.default(
        query, gallery, query_labels, gallery_labels, [float(L) for L in recall_levels], empty,
        bool(exclude_self),
    )


@torch.library.register_fake("sdml::cosine_topk")
def _cosine_topk_fake(query, gallery, k, exclude_self=False):
    n = query.shape[0]
    return query.new_empty((n, k)), query.new_empty((n, k), dtype=torch.int64)


@torch.library.register_fake("sdml::average_precision")
def _average_precision_fake(query, gallery, query_labels, gallery_labels, k=None, divisor="retrieved",
                             empty="zero", exclude_self=False):
    return query.new_empty((query.shape[0],), dtype=torch.float64)


@torch.library.register_fake("sdml::precision_at_k")
def _precision_at_k_fake(query, gallery, query_labels, gallery_labels, ks, empty="zero", exclude_self=False):
    return query.new_empty((query.shape[0], len(ks)), dtype=torch.float64)


@torch.library.register_fake("sdml::precision_recall_curve")
def _precision_recall_curve_fake(query, gallery, query_labels, gallery_labels, recall_levels, empty="zero",
                                 exclude_self=False):
    return query.new_empty((query.shape[0], len(recall_levels)), dtype=torch.float64)
