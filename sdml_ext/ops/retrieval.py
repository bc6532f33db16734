"""Retrieval ops: cosine top-k and ranking metrics (AP, precision@K, precision-recall).

Schemas are declared in ``csrc/registration/retrieval.cpp``; kernels live in ``csrc/``. Every op
ranks the gallery for each query by descending cosine similarity, equal scores by ascending
gallery index, without ever holding the full [Nq, Ng] similarity matrix. Inputs need not be
normalized. The metric ops return per-query values (float64); NaN marks a query left out under
``empty="skip"`` (see :mod:`sdml_ext.metrics` for the means and the cross-modal table).

Labels are class ids ``[N]`` (any integer dtype, -1 = unlabelled) — relevant means the same class —
or multi-hot rows ``[N, c]`` (any numeric dtype, non-zero = has the class) — relevant means sharing
a class. An unlabelled / all-zero query has no relevant item; an unlabelled gallery item is
relevant to nothing.

None of these ops is differentiable (rankings are piecewise constant): inputs that require grad
are accepted and read as plain values, and no output requires grad (to train through similarity
scores, recompute the returned indices' scores in PyTorch).

Cut-offs are named ``k`` everywhere: AP@k takes one (or None for all items), precision@K one or
a sequence.

Exact duplicate gallery rows (equal values) always get the same score, so they tie and come in
ascending index order wherever they sit in the gallery. Scores of distinct rows are those of a
tiled GEMM (float rounding of the exact cosine): a query's scores may differ in the last bit
with the tile the query falls in (its position in the query batch, the thread count).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels and their schemas)

#: The paper's precision-scope cut-offs.
DEFAULT_KS = tuple(range(100, 1001, 100))
#: One cut-off or several.
Cutoffs = Union[int, Sequence[int]]
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


def average_precision_pair(
    a: Tensor,
    b: Tensor,
    a_labels: Tensor,
    b_labels: Tensor,
    k: int | None = None,
    *,
    divisor: str = "retrieved",
    empty: str = "zero",
) -> tuple[Tensor, Tensor]:
    """Per-query AP@k in both directions of a cross-modal pair from ONE similarity computation.

    Returns ``(a_to_b [Na], b_to_a [Nb])`` float64: equal to ``average_precision(a, b, ...)`` and
    ``average_precision(b, a, ...)`` (b's scores against a are the transpose of a's against b),
    for half the GEMM work. Holds the [Nb, Na] scores in memory (input dtype): 2.2 GB at
    23,661² float32; use two :func:`average_precision` calls where that does not fit (and past
    ~1 GB, where writing the transposed scores costs more than the GEMM it saves on CPU).

    Args:
        a, b: [Na, d] and [Nb, d] embeddings of two modalities (see :func:`cosine_topk`).
        a_labels, b_labels: [Na] / [Nb] class ids or [Na, c] / [Nb, c] multi-hot rows.
        k, divisor, empty: as in :func:`average_precision`.

    Error messages call a the query and b the gallery (a_labels / b_labels: query_labels /
    gallery_labels), as the first direction does.
    """
    a_to_b, b_to_a = torch.ops.sdml.average_precision_pair.default(
        a, b, a_labels, b_labels, None if k is None else int(k), divisor, empty
    )
    return a_to_b, b_to_a


def precision_at_k(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    k: Cutoffs = DEFAULT_KS,
    *,
    empty: str = "zero",
    exclude_self: bool = False,
) -> Tensor:
    """Per-query precision within the top K for each cut-off K in k (the precision-scope curve).

    Returns [Nq] float64 for one cut-off (an int k), [Nq, len(k)] for a sequence.
    P@K = (relevant items among the top K) / min(K, items ranked). A query with no relevant item
    in the whole gallery gets 0 (``empty="zero"``) or NaN (``"skip"``). Other arguments as in
    :func:`average_precision`.
    """
    single = isinstance(k, int)
    cutoffs = [int(k)] if single else [int(K) for K in k]
    out = torch.ops.sdml.precision_at_k.default(
        query, gallery, query_labels, gallery_labels, cutoffs, empty, bool(exclude_self)
    )
    return out[:, 0] if single else out


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


# ---- fake (meta) implementations: output shapes, and the checks that need no data --------------
# They run for meta / fake tensors (torch.compile tracing, FakeTensorMode) and for a call mixing a
# meta tensor with real ones, so they check what the kernels check from shapes alone.


def _check_embeddings(query, gallery, exclude_self):
    torch._check_type(query.dtype.is_floating_point, lambda: f"query must be a floating-point tensor, got {query.dtype}")
    torch._check_type(gallery.dtype == query.dtype,
                      lambda: f"gallery has dtype {gallery.dtype} but query has dtype {query.dtype}")
    torch._check_value(query.dim() == 2, lambda: f"query must be a 2-D tensor, got shape {tuple(query.shape)}")
    torch._check_value(gallery.dim() == 2, lambda: f"gallery must be a 2-D tensor, got shape {tuple(gallery.shape)}")
    torch._check_value(gallery.device == query.device,
                       lambda: f"gallery is on {gallery.device} but query is on {query.device}; move them to one device")
    torch._check_value(query.shape[1] > 0, lambda: "query has no columns (embedding size d = 0)")
    torch._check_value(gallery.shape[1] == query.shape[1],
                       lambda: "query and gallery must have the same embedding size d, got query "
                               f"{tuple(query.shape)} and gallery {tuple(gallery.shape)}")
    torch._check_value(gallery.shape[0] > 0, lambda: "gallery has no rows (nothing to rank)")
    if exclude_self:
        torch._check_value(query.shape[0] == gallery.shape[0],
                           lambda: "exclude_self needs the query and gallery to be the same samples (as many rows)")
        torch._check_value(gallery.shape[0] > 1, lambda: "with exclude_self a one-row gallery leaves nothing to rank")


def _check_labels(query, gallery, query_labels, gallery_labels):
    for name, labels in (("query_labels", query_labels), ("gallery_labels", gallery_labels)):
        torch._check_value(labels.device == query.device,
                           lambda: f"{name} is on {labels.device} but query is on {query.device}; move them to one device")
    torch._check_value(query_labels.dim() in (1, 2) and query_labels.dim() == gallery_labels.dim(),
                       lambda: "query_labels and gallery_labels must both be class ids [N] or both multi-hot rows [N, c]")
    torch._check_value(query_labels.shape[0] == query.shape[0],
                       lambda: f"query_labels must have one entry per query row ({query.shape[0]})")
    torch._check_value(gallery_labels.shape[0] == gallery.shape[0],
                       lambda: f"gallery_labels must have one entry per gallery row ({gallery.shape[0]})")
    if query_labels.dim() == 2:
        torch._check_value(query_labels.shape[1] > 0 and gallery_labels.shape[1] == query_labels.shape[1],
                           lambda: "query_labels and gallery_labels must have the same positive number of classes")


@torch.library.register_fake("sdml::cosine_topk")
def _cosine_topk_fake(query, gallery, k, exclude_self=False):
    _check_embeddings(query, gallery, exclude_self)
    ranked = gallery.shape[0] - (1 if exclude_self else 0)
    torch._check_value(0 < k <= ranked, lambda: f"k = {k} must lie in [1, {ranked}] (the items each query ranks)")
    n = query.shape[0]
    return query.new_empty((n, k)), query.new_empty((n, k), dtype=torch.int64)


@torch.library.register_fake("sdml::average_precision")
def _average_precision_fake(query, gallery, query_labels, gallery_labels, k=None, divisor="retrieved",
                             empty="zero", exclude_self=False):
    _check_embeddings(query, gallery, exclude_self)
    _check_labels(query, gallery, query_labels, gallery_labels)
    torch._check_value(k is None or k > 0, lambda: f"k must be positive (or None for all items), got {k}")
    return query.new_empty((query.shape[0],), dtype=torch.float64)


@torch.library.register_fake("sdml::average_precision_pair")
def _average_precision_pair_fake(a, b, a_labels, b_labels, k=None, divisor="retrieved", empty="zero"):
    _check_embeddings(a, b, False)
    torch._check_value(a.shape[0] > 0, lambda: "a has no rows (nothing to rank for b's queries)")
    _check_labels(a, b, a_labels, b_labels)
    torch._check_value(k is None or k > 0, lambda: f"k must be positive (or None for all items), got {k}")
    return a.new_empty((a.shape[0],), dtype=torch.float64), a.new_empty((b.shape[0],), dtype=torch.float64)


@torch.library.register_fake("sdml::precision_at_k")
def _precision_at_k_fake(query, gallery, query_labels, gallery_labels, k, empty="zero", exclude_self=False):
    _check_embeddings(query, gallery, exclude_self)
    _check_labels(query, gallery, query_labels, gallery_labels)
    torch._check_value(len(k) > 0 and all(K > 0 for K in k), lambda: f"k must list positive cut-offs, got {list(k)}")
    return query.new_empty((query.shape[0], len(k)), dtype=torch.float64)


@torch.library.register_fake("sdml::precision_recall_curve")
def _precision_recall_curve_fake(query, gallery, query_labels, gallery_labels, recall_levels, empty="zero",
                                 exclude_self=False):
    _check_embeddings(query, gallery, exclude_self)
    _check_labels(query, gallery, query_labels, gallery_labels)
    torch._check_value(len(recall_levels) > 0 and all(0.0 <= L <= 1.0 for L in recall_levels),
                       lambda: f"recall_levels must list levels in [0, 1], got {list(recall_levels)}")
    return query.new_empty((query.shape[0], len(recall_levels)), dtype=torch.float64)
