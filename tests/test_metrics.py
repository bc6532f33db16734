"""sdml_ext.eval.metrics: the cross-modal mAP table and the per-pair curves, against the references."""

import math

import numpy as np
import pytest
import torch

from sdml_ext import metrics

import retrieval_reference as ref
from helpers import class_structured


def three_modalities(kind, seed=0):
    """Three modalities of different sizes sharing a label space and class centers."""
    q, g, ql, gl = class_structured(60, 90, 8, kind, seed=seed)
    x, _, xl, _ = class_structured(45, 1, 8, kind, seed=seed)  # same centers (same seed)
    return [q, g, x], [ql, gl, xl]


@pytest.mark.parametrize("kind, empty", [("class_ids", "zero"), ("multi_hot", "skip"), ("multi_hot_wide", "zero")])
@pytest.mark.parametrize("k", [None, 50])
def test_cross_modal_map_matches_reference(k, kind, empty):
    emb, labels = three_modalities(kind)
    result = metrics.cross_modal_map(emb, labels, k=k, names=["image", "text", "audio"], empty=empty)
    assert result.table.shape == (3, 3) and result.table.dtype == torch.float64
    pair_values = []
    for q in range(3):
        assert math.isnan(float(result.table[q, q]))
        for g in range(3):
            if q == g:
                continue
            ap = ref.average_precision(ref.cosine_scores(emb[q], emb[g]), ref.relevance(labels[q], labels[g]), k,
                                       empty=empty)
            assert abs(float(result.table[q, g]) - np.nanmean(ap)) <= 1e-12
            pair_values.append(np.nanmean(ap))
    assert abs(result.average - np.mean(pair_values)) <= 1e-12
    assert result.pair("text", "image") == float(result.table[1, 0])


@pytest.mark.parametrize("kind", ["class_ids", "multi_hot_wide"])
def test_one_gemm_per_pair_equals_one_per_direction(kind):
    """Both directions from one similarity computation (the default) give the table that one
    computation per direction gives (pair_memory_bytes=0 forces that)."""
    emb, labels = three_modalities(kind, seed=4)
    both = metrics.cross_modal_map(emb, labels, k=20)
    each = metrics.cross_modal_map(emb, labels, k=20, pair_memory_bytes=0)
    assert torch.equal(both.table.nan_to_num(-1), each.table.nan_to_num(-1))


def test_skip_leaves_empty_queries_out_of_the_mean():
    emb, labels = three_modalities("multi_hot", seed=1)
    labels[0][:10] = 0  # ten queries with no relevant item anywhere
    zero = metrics.cross_modal_map(emb, labels, empty="zero")
    skip = metrics.cross_modal_map(emb, labels, empty="skip")
    scores, rel = ref.cosine_scores(emb[0], emb[1]), ref.relevance(labels[0], labels[1])
    ap_zero, ap_skip = ref.average_precision(scores, rel), ref.average_precision(scores, rel, empty="skip")
    assert np.isnan(ap_skip[:10]).all()
    assert abs(float(zero.table[0, 1]) - ap_zero.mean()) <= 1e-12
    assert abs(float(skip.table[0, 1]) - np.nanmean(ap_skip)) <= 1e-12
    assert float(skip.table[0, 1]) > float(zero.table[0, 1])


def test_format_prints_the_paper_table():
    emb, labels = three_modalities("class_ids")
    result = metrics.cross_modal_map(emb, labels, names=["img", "txt", "aud"])
    text = str(result)
    lines = text.splitlines()
    assert lines[0] == "mAP@all (divisor=retrieved, empty=zero)"
    assert lines[1].split()[-3:] == ["img", "txt", "aud"]
    assert lines[2].split()[0] == "img" and lines[2].split()[1] == "-"
    assert f"{float(result.table[2, 0]):.3f}" in lines[4]
    assert lines[-1] == f"average over 6 pairs: {result.average:.3f}"
    renamed = result.format(names=["Image", "Text", "Audio"], digits=4)
    assert "Audio" in renamed and f"{result.average:.4f}" in renamed
    assert "modality 1" in str(metrics.cross_modal_map(emb, labels, k=5))


def test_curves_per_pair():
    emb, labels = three_modalities("class_ids", seed=2)
    pk = metrics.precision_at_k_curves(emb, labels, k=[1, 10, 40], names=["a", "b", "c"])
    pr = metrics.precision_recall_curves(emb, labels, names=["a", "b", "c"])
    assert set(pk.curves) == set(pr.curves) == {(q, g) for q in "abc" for g in "abc" if q != g}
    assert pk.x.tolist() == [1.0, 10.0, 40.0] and pr.x.shape == (11,)
    scores, rel = ref.cosine_scores(emb[2], emb[0]), ref.relevance(labels[2], labels[0])
    np.testing.assert_allclose(pk.curves[("c", "a")].numpy(), ref.precision_at_k(scores, rel, [1, 10, 40]).mean(0),
                               atol=1e-12)
    np.testing.assert_allclose(pr.curves[("c", "a")].numpy(),
                               ref.precision_recall(scores, rel, pr.x.tolist()).mean(0), atol=1e-12)


def test_mean_average_precision_and_mean_over_queries():
    emb, labels = three_modalities("multi_hot", seed=3)
    ap = metrics.mean_average_precision(emb[0], emb[1], labels[0], labels[1], empty="skip")
    per_query = ref.average_precision(ref.cosine_scores(emb[0], emb[1]), ref.relevance(labels[0], labels[1]),
                                      empty="skip")
    assert abs(ap - np.nanmean(per_query)) <= 1e-12
    assert math.isnan(float(metrics.mean_over_queries(torch.full((3,), float("nan")))))


def test_bad_arguments():
    emb, labels = three_modalities("class_ids")
    with pytest.raises(ValueError, match="one label tensor per modality"):
        metrics.cross_modal_map(emb, labels[:2])
    with pytest.raises(ValueError, match="at least 2 modalities"):
        metrics.cross_modal_map(emb[:1], labels[:1])
    with pytest.raises(ValueError, match="one name per modality"):
        metrics.cross_modal_map(emb, labels, names=["a"])
    with pytest.raises(ValueError, match="query and gallery must have the same embedding size"):
        metrics.cross_modal_map([emb[0], emb[1][:, :4]], labels[:2])
