// Schemas of the retrieval ops (kernels in csrc/cpu/retrieval.cpp and csrc/cuda/retrieval.cu;
// Python faces and fake implementations in sdml_ext/ops/retrieval.py). Query and gallery are
// embeddings [Nq, d] and [Ng, d], compared by cosine similarity; labels are class ids [N]
// (-1 = unlabelled) or multi-hot rows [N, c].
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sdml, m) {
  // The k most similar gallery items per query: scores [Nq, k] (input dtype), indices [Nq, k] int64.
  m.def("cosine_topk(Tensor query, Tensor gallery, int k, bool exclude_self=False) -> (Tensor scores, Tensor indices)");
  // Per-query AP@k [Nq] float64 (k=None: all items); NaN marks a skipped query (empty="skip").
  m.def(
      "average_precision(Tensor query, Tensor gallery, Tensor query_labels, Tensor gallery_labels, "
      "int? k=None, str divisor=\"retrieved\", str empty=\"zero\", bool exclude_self=False) -> Tensor");
  // Both directions of a cross-modal pair from one similarity computation: per-query AP@k of
  // a's queries against b [Na] and of b's queries against a [Nb], float64 (memory: Na x Nb scores).
  m.def(
      "average_precision_pair(Tensor a, Tensor b, Tensor a_labels, Tensor b_labels, int? k=None, "
      "str divisor=\"retrieved\", str empty=\"zero\") -> (Tensor a_to_b, Tensor b_to_a)");
  // Per-query precision at each cut-off K in k [Nq, len(k)] float64.
  m.def(
      "precision_at_k(Tensor query, Tensor gallery, Tensor query_labels, Tensor gallery_labels, "
      "int[] k, str empty=\"zero\", bool exclude_self=False) -> Tensor");
  // Per-query interpolated precision at each recall level [Nq, len(recall_levels)] float64.
  m.def(
      "precision_recall_curve(Tensor query, Tensor gallery, Tensor query_labels, Tensor gallery_labels, "
      "float[] recall_levels, str empty=\"zero\", bool exclude_self=False) -> Tensor");
}

// Not differentiable (rankings are piecewise constant): autograd passes straight through to the
// kernels, which read inputs that require grad as plain values; no output requires grad.
TORCH_LIBRARY_IMPL(sdml, Autograd, m) {
  for (const char* op : {"cosine_topk", "average_precision", "average_precision_pair", "precision_at_k",
                         "precision_recall_curve"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}
