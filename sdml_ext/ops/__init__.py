"""Python faces of the compiled ops (``torch.ops.sdml.*``), one module per op family, each with
its fake (meta) implementations and autograd. Schemas are declared in ``csrc/registration/*.cpp``;
kernels live in ``csrc/``.
"""

from .dsae_loss import DSAELossOutput, dsae_loss
from .retrieval import (
    TopK,
    average_precision,
    average_precision_pair,
    cosine_topk,
    precision_at_k,
    precision_recall_curve,
)

__all__ = [
    "DSAELossOutput",
    "dsae_loss",
    "TopK",
    "average_precision",
    "average_precision_pair",
    "cosine_topk",
    "precision_at_k",
    "precision_recall_curve",
]
