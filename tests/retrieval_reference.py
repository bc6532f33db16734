"""Plain numpy references of the retrieval ops, written from the paper's evaluation definitions,
plus a reproduction of the authors' evaluation code.

The definitions: gallery ranked per query by descending cosine similarity, ties by ascending
gallery index; relevant = same class id, or multi-hot label rows sharing a class;
AP@k = (1/r) sum_{j<=k} rel_j * (sum_{t<=j} rel_t) / j with r = sum_{j<=k} rel_j (the relevant
items retrieved within k, not all relevant items), 0 when r = 0; k = gallery size for mAP@all."""

from __future__ import annotations

import numpy as np
import scipy.spatial.distance
import torch


def cosine_scores(query, gallery) -> np.ndarray:
    """[Nq, Ng] cosine similarities in float64. Each one is summed the same way wherever its
    rows sit (a row-wise numpy sum, not a GEMM, which may round a dot product differently at
    different output positions), so identical rows score identically."""
    q = torch.nn.functional.normalize(query.double().cpu(), dim=1).numpy()
    g = torch.nn.functional.normalize(gallery.double().cpu(), dim=1).numpy()
    out = np.empty((q.shape[0], g.shape[0]))
    for i, row in enumerate(q):
        out[i] = (g * row).sum(axis=1)
    return out


def relevance(query_labels, gallery_labels) -> np.ndarray:
    """[Nq, Ng] bool: same class id (>= 0), or multi-hot rows sharing a class."""
    ql, gl = query_labels.cpu(), gallery_labels.cpu()
    if ql.dim() == 1:
        ql, gl = ql.numpy(), gl.numpy()
        return (ql[:, None] == gl[None, :]) & (ql[:, None] >= 0)
    return ((ql != 0).double() @ (gl != 0).double().T).numpy() > 0


def ranking(scores_row: np.ndarray, exclude: int | None = None) -> np.ndarray:
    """Gallery indices by descending score, ties by ascending index; `exclude` left out."""
    order = np.lexsort((np.arange(scores_row.size), -scores_row))
    return order if exclude is None else order[order != exclude]


def topk(scores: np.ndarray, k: int, exclude_self: bool = False):
    idx = np.stack([ranking(s, i if exclude_self else None)[:k] for i, s in enumerate(scores)])
    return np.take_along_axis(scores, idx, axis=1), idx


def _ranked_relevance(scores, rel, exclude_self):
    for i in range(scores.shape[0]):
        yield rel[i, ranking(scores[i], i if exclude_self else None)].astype(np.float64)


def average_precision(scores, rel, k=None, divisor="retrieved", empty="zero", exclude_self=False) -> np.ndarray:
    out = []
    for r_all in _ranked_relevance(scores, rel, exclude_self):
        r = r_all[: len(r_all) if k is None else k]
        hits = r.sum()
        if hits == 0:
            out.append(0.0 if empty == "zero" else np.nan)
            continue
        precision = np.cumsum(r) / np.arange(1, len(r) + 1)
        out.append((precision * r).sum() / (hits if divisor == "retrieved" else r_all.sum()))
    return np.array(out)


def precision_at_k(scores, rel, ks, empty="zero", exclude_self=False) -> np.ndarray:
    out = []
    for r in _ranked_relevance(scores, rel, exclude_self):
        if r.sum() == 0:
            out.append([0.0 if empty == "zero" else np.nan] * len(ks))
        else:
            out.append([r[:K].sum() / min(K, len(r)) for K in ks])
    return np.array(out)


def precision_recall(scores, rel, levels, empty="zero", exclude_self=False) -> np.ndarray:
    out = []
    for r in _ranked_relevance(scores, rel, exclude_self):
        R = r.sum()
        if R == 0:
            out.append([0.0 if empty == "zero" else np.nan] * len(levels))
            continue
        hits = np.cumsum(r)
        precision = (hits / np.arange(1, len(r) + 1))[r > 0]
        recall = hits[r > 0] / R
        out.append([precision[recall >= L - 1e-12].max() for L in levels])
    return np.array(out)


def authors_map(query, gallery, query_labels, gallery_labels, k=0) -> float:
    """The authors' evaluation (fx_calc_map_label and its multi-label variant): scipy cosine
    distances, argsort, AP divided by the hits within k; multi-label queries without a hit are
    left out, single-label ones count 0. A stable argsort stands in for their unstable one (ties
    by ascending index, our documented rule)."""
    dist = scipy.spatial.distance.cdist(query.double().numpy(), gallery.double().numpy(), "cosine")
    order = dist.argsort(kind="stable")
    k = k or dist.shape[1]
    multi = query_labels.dim() == 2
    ql, gl = query_labels.numpy(), gallery_labels.numpy()
    res = []
    for i in range(dist.shape[0]):
        p = r = 0.0
        for j in range(k):
            g = order[i, j]
            relevant = np.dot(ql[i], gl[g]) > 0 if multi else (ql[i] == gl[g] and ql[i] >= 0)
            if relevant:
                r += 1
                p += r / (j + 1)
        if r > 0:
            res.append(p / r)
        elif not multi:
            res.append(0.0)
    return float(np.mean(res))
