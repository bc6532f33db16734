"""Every retrieval op checks its arguments' ranks before it reads a size: a 0-D or otherwise
wrong-rank tensor gives a ValueError naming the argument (never an IndexError from size(0)),
eagerly (the kernels' shared prologue) and under FakeTensorMode (the fake implementations)."""

import pytest
import torch

from torch._subclasses.fake_tensor import FakeTensorMode

from sdml_ext.ops import average_precision, average_precision_pair, cosine_topk, precision_at_k, precision_recall_curve

NQ, NG, D = 4, 6, 3


def _args():
    """Valid arguments (any values: the rank checks come first), made in the current mode."""
    return dict(query=torch.randn(NQ, D), gallery=torch.randn(NG, D),
                query_labels=torch.zeros(NQ, dtype=torch.long), gallery_labels=torch.zeros(NG, dtype=torch.long))


# Every op, called with the four arguments by their names (average_precision_pair's a / b are
# named query / gallery in its messages, as its first direction).
OPS = {
    "cosine_topk": lambda query, gallery, **_: cosine_topk(query, gallery, 2),
    "average_precision": lambda **a: average_precision(**a),
    "average_precision_pair": lambda query, gallery, query_labels, gallery_labels: average_precision_pair(
        query, gallery, query_labels, gallery_labels),
    "precision_at_k": lambda **a: precision_at_k(**a, k=[1, 2]),
    "precision_recall_curve": lambda **a: precision_recall_curve(**a, recall_levels=[0.5]),
}


def _wrong(name):
    """Wrong-rank replacements for argument `name`: 0-D, and the ranks next to the right one."""
    if name in ("query", "gallery"):
        n = NQ if name == "query" else NG
        return {"0-D": lambda: torch.ones(()), "1-D": lambda: torch.ones(n), "3-D": lambda: torch.ones(n, D, 1)}
    n = NQ if name == "query_labels" else NG
    return {"0-D": lambda: torch.zeros((), dtype=torch.long), "3-D": lambda: torch.zeros(n, 2, 1, dtype=torch.long)}


# What the message says: the argument's name (the labels' rule names both label arguments).
MATCH = {
    "query": r"query must be a 2-D tensor",
    "gallery": r"gallery must be a 2-D tensor",
    "query_labels": r"query_labels and gallery_labels must both be class ids",
    "gallery_labels": r"query_labels and gallery_labels must both be class ids",
}

CASES = [(op, name, rank) for op in OPS for name in MATCH for rank in _wrong(name)
         if not (op == "cosine_topk" and "labels" in name)]


def _call(op, name, rank):
    args = _args()
    args[name] = _wrong(name)[rank]()
    return OPS[op](**args)


@pytest.mark.parametrize("op, name, rank", CASES)
def test_wrong_rank_is_a_value_error_naming_the_argument(op, name, rank):
    with pytest.raises(ValueError, match=f"{op}: {MATCH[name]}"):
        _call(op, name, rank)


@pytest.mark.parametrize("op, name, rank", CASES)
def test_wrong_rank_under_fake_tensors(op, name, rank):
    with FakeTensorMode(), pytest.raises(ValueError, match=MATCH[name]):
        _call(op, name, rank)


@pytest.mark.parametrize("op", OPS)
def test_valid_ranks_pass_both_ways(op):
    """The cases above differ from a working call only in the one argument."""
    OPS[op](**_args())
    with FakeTensorMode():
        OPS[op](**_args())


def test_rank_is_checked_before_the_options():
    """A 0-D query with a bad option: the rank is reported (the options need the sizes)."""
    args = _args()
    args["query"] = torch.ones(())
    with pytest.raises(ValueError, match="average_precision: query must be a 2-D tensor"):
        average_precision(**args, k=0)
    args = _args()
    args["gallery"] = torch.ones(())
    with pytest.raises(ValueError, match="cosine_topk: gallery must be a 2-D tensor"):
        cosine_topk(args["query"], args["gallery"], 0)
