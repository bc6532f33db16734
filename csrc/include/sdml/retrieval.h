#pragma once
// Host entry points shared by the CPU and CUDA retrieval kernels (schemas in
// csrc/registration/retrieval.cpp; metric math in sdml/retrieval_math.h).
#include <optional>
#include <string_view>
#include <utility>

#include <ATen/core/Tensor.h>

#include "sdml/retrieval_math.h"

namespace sdml {

// The sizes of a retrieval call whose arguments passed retrieval_prologue.
struct RetrievalSizes {
  int64_t nq, ng, d;  // query rows, gallery rows, embedding size
  int64_t ranked;     // items each query ranks: ng, less the query itself under exclude_self
};

// The first thing every retrieval entry point (CPU and CUDA) does, before it reads a size or
// allocates an output: validates query [Nq, d] and gallery [Ng, d] (floating, one dtype and
// device, 2-D, d > 0, Ng > 0; Nq == Ng > 1 under exclude_self) and, for the metric ops, the
// labels' ranks, row counts and devices; then returns the sizes. A wrong rank (a 0-D tensor
// included) raises a ValueError naming the argument, as the fake implementations do. The data
// checks (finite values, zero norms, label values) follow in normalized_embeddings and
// prepare_labels.
RetrievalSizes retrieval_prologue(const char* op, const at::Tensor& query, const at::Tensor& gallery,
                                  bool exclude_self);
RetrievalSizes retrieval_prologue(const char* op, const at::Tensor& query, const at::Tensor& gallery,
                                  const at::Tensor& query_labels, const at::Tensor& gallery_labels,
                                  bool exclude_self);

// Validates query [Nq, d] and gallery [Ng, d] (floating, one dtype and device, finite, no
// zero-norm row; Nq == Ng when exclude_self) and returns contiguous L2-normalized copies,
// detached: the ops are not differentiable, and their outputs never require grad.
std::pair<at::Tensor, at::Tensor> normalized_embeddings(const char* op, const at::Tensor& query,
                                                        const at::Tensor& gallery, bool exclude_self);

// As normalized_embeddings (the same checks), for kernels that normalize gallery blocks as they
// score them (no normalized copy of a large gallery): the normalized query, the gallery as given
// (contiguous, detached) and its checked row norms [Ng, 1]. gallery[t] / gallery_norms[t] is
// bit for bit normalized_embeddings' row t (IEEE division is correctly rounded).
struct EmbeddingsWithGalleryNorms {
  at::Tensor query, gallery, gallery_norms;
};
EmbeddingsWithGalleryNorms embeddings_with_gallery_norms(const char* op, const at::Tensor& query,
                                                         const at::Tensor& gallery, bool exclude_self);

// Relevance labels in kernel form. Class ids: int64 [N], -1 = unlabelled (relevant to nothing).
// Multi-hot: int64 [N, words], bit j of word w set when the row has class 64 w + j.
struct RetrievalLabels {
  bool multi_hot;
  at::Tensor query, gallery;
  int64_t words() const { return multi_hot ? query.size(1) : 0; }
};

// Validates query_labels [Nq] / [Nq, c] and gallery_labels [Ng] / [Ng, c] against the rows of
// query and gallery, on query's device.
RetrievalLabels prepare_labels(const char* op, const at::Tensor& query_labels,
                               const at::Tensor& gallery_labels, const at::Tensor& query,
                               const at::Tensor& gallery);

retrieval::Divisor parse_divisor(const char* op, std::string_view divisor);
retrieval::Empty parse_empty(const char* op, std::string_view empty);

// Items each query ranks: the gallery, less the query itself under exclude_self.
inline int64_t ranked_items(int64_t gallery_rows, bool exclude_self) {
  return gallery_rows - (exclude_self ? 1 : 0);
}

// k for AP@k: None means all ranked items; otherwise positive (larger k is the same as all).
int64_t resolve_k(const char* op, std::optional<int64_t> k, int64_t ranked);

// k of cosine_topk: 1 <= k <= ranked (the items each query ranks).
void check_topk_k(const char* op, int64_t k, int64_t ranked, bool exclude_self);

// Validates the cut-offs k of precision_at_k (at least one, all positive) and the recall
// levels (in [0, 1]).
void check_cutoffs(const char* op, at::IntArrayRef k);
void check_recall_levels(const char* op, at::ArrayRef<double> levels);

// Gallery rows that repeat an earlier row exactly (equal values; -0 equals +0): dup[i] is a
// duplicate of rep[i] < dup[i], the first row with its values. int64 [n], dup ascending, on the
// gallery's device. The kernels give a duplicate its first row's score (a GEMM may round the
// same dot product differently at different positions), so identical rows always tie.
struct DuplicateRows {
  at::Tensor dup, rep;
  int64_t size() const { return dup.size(0); }
};
DuplicateRows duplicate_rows(const at::Tensor& gallery);

}  // namespace sdml
