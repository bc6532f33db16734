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
  // Per-query precision at each cut-off K [Nq, len(ks)] float64.
  m.def(
      "precision_at_k(Tensor query, Tensor gallery, Tensor query_labels, Tensor gallery_labels, "
      "int[] ks, str empty=\"zero\", bool exclude_self=False) -> Tensor");
  // Per-query interpolated precision at each recall level [Nq, len(recall_levels)] float64.
  m.def(
      "precision_recall_curve(Tensor query, Tensor gallery, Tensor query_labels, Tensor gallery_labels, "
      "float[] recall_levels, str empty=\"zero\", bool exclude_self=False) -> Tensor");
}
