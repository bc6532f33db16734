// Argument validation and input preparation shared by the CPU and CUDA retrieval kernels:
// normalized embeddings, labels in kernel form (class ids or packed label bits), options.
#include "sdml/retrieval.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "sdml/checks.h"

namespace sdml {
namespace {

// The first row whose norm is non-finite or zero; raises a ValueError naming the argument.
void check_row_norms(const char* op, const char* name, const at::Tensor& norms) {
  const at::Tensor non_finite = norms.isfinite().logical_not();
  if (non_finite.any().item<bool>()) {
    SDML_CHECK_VALUE(false, op, ": ", name, " contains NaN or Inf (row ",
                     non_finite.to(at::kByte).argmax().item<int64_t>(),
                     ", or its norm overflows); cosine similarity is undefined");
  }
  const at::Tensor zero = norms.eq(0);
  if (zero.any().item<bool>()) {
    SDML_CHECK_VALUE(false, op, ": ", name, " row ", zero.to(at::kByte).argmax().item<int64_t>(),
                     " has zero norm; cosine similarity is undefined for it");
  }
}

at::Tensor normalize_rows(const char* op, const char* name, const at::Tensor& t) {
  const at::Tensor norms = at::linalg_vector_norm(t, 2, {1}, /*keepdim=*/true);
  check_row_norms(op, name, norms);
  return at::div(t, norms).contiguous();
}

// Multi-hot rows [N, c] (any numeric dtype, non-zero = has the class) as int64 [N, words]
// bit sets. The bits of a word are distinct powers of two, so their sum is their OR.
at::Tensor pack_label_bits(const at::Tensor& rows, int64_t words) {
  const int64_t n = rows.size(0), c = rows.size(1);
  std::vector<int64_t> weights(64);
  for (int j = 0; j < 64; ++j) weights[j] = static_cast<int64_t>(uint64_t{1} << j);
  const at::Tensor w = at::tensor(weights, at::kLong).to(rows.device());
  const at::Tensor bits = at::constant_pad_nd(rows.ne(0).to(at::kLong), {0, words * 64 - c});
  return bits.view({n, words, 64}).mul(w).sum(-1).contiguous();
}

void check_label_values(const char* op, const char* name, const at::Tensor& labels) {
  if (labels.dim() == 1) {
    TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool &&
                         !at::isComplexType(labels.scalar_type()),
                     op, ": ", name, " as a 1-D tensor holds class ids and must be an integer tensor, got ",
                     labels.scalar_type(), " (multi-hot labels are 2-D)");
    if (labels.numel() > 0) {
      const int64_t lowest = labels.min().item<int64_t>();
      SDML_CHECK_VALUE(lowest >= -1, op, ": ", name, " class ids must be >= -1 (-1 = unlabelled), got ",
                       lowest);
    }
  } else {
    TORCH_CHECK_TYPE(!at::isComplexType(labels.scalar_type()), op, ": ", name,
                     " must be a real tensor, got ", labels.scalar_type());
    if (at::isFloatingType(labels.scalar_type()) && labels.numel() > 0) {
      SDML_CHECK_VALUE(labels.isfinite().all().item<bool>(), op, ": ", name, " contains NaN or Inf");
    }
  }
}

}  // namespace

std::pair<at::Tensor, at::Tensor> normalized_embeddings(const char* op, const at::Tensor& query,
                                                        const at::Tensor& gallery, bool exclude_self) {
  SDML_CHECK_FLOATING(op, query);
  SDML_CHECK_FLOATING(op, gallery);
  SDML_CHECK_DIM(op, query, 2);
  SDML_CHECK_DIM(op, gallery, 2);
  SDML_CHECK_DEVICE(op, gallery, query);
  SDML_CHECK_SAME_DTYPE(op, gallery, query);
  SDML_CHECK_VALUE(query.size(1) > 0, op, ": query has no columns (embedding size d = 0)");
  SDML_CHECK_VALUE(gallery.size(1) == query.size(1), op,
                   ": query and gallery must have the same embedding size d, got query ", query.sizes(),
                   " and gallery ", gallery.sizes());
  SDML_CHECK_VALUE(gallery.size(0) > 0, op, ": gallery has no rows (nothing to rank)");
  if (exclude_self) {
    SDML_CHECK_VALUE(query.size(0) == gallery.size(0), op,
                     ": exclude_self needs the query and gallery to be the same samples (as many rows), got ",
                     query.size(0), " query and ", gallery.size(0), " gallery rows");
    SDML_CHECK_VALUE(gallery.size(0) > 1, op,
                     ": with exclude_self a one-row gallery leaves nothing to rank");
  }
  return {normalize_rows(op, "query", query), normalize_rows(op, "gallery", gallery)};
}

RetrievalLabels prepare_labels(const char* op, const at::Tensor& query_labels,
                               const at::Tensor& gallery_labels, const at::Tensor& query,
                               const at::Tensor& gallery) {
  SDML_CHECK_DEVICE(op, query_labels, query);
  SDML_CHECK_DEVICE(op, gallery_labels, query);
  const int64_t qd = query_labels.dim(), gd = gallery_labels.dim();
  SDML_CHECK_VALUE((qd == 1 || qd == 2) && qd == gd, op,
                   ": query_labels and gallery_labels must both be class ids [N] or both multi-hot rows "
                   "[N, c], got shapes ", query_labels.sizes(), " and ", gallery_labels.sizes());
  SDML_CHECK_VALUE(query_labels.size(0) == query.size(0), op,
                   ": query_labels must have one entry per query row (", query.size(0), "), got shape ",
                   query_labels.sizes());
  SDML_CHECK_VALUE(gallery_labels.size(0) == gallery.size(0), op,
                   ": gallery_labels must have one entry per gallery row (", gallery.size(0),
                   "), got shape ", gallery_labels.sizes());
  check_label_values(op, "query_labels", query_labels);
  check_label_values(op, "gallery_labels", gallery_labels);
  if (qd == 1) return {false, query_labels.to(at::kLong).contiguous(), gallery_labels.to(at::kLong).contiguous()};
  const int64_t c = query_labels.size(1);
  SDML_CHECK_VALUE(c > 0 && gallery_labels.size(1) == c, op,
                   ": query_labels and gallery_labels must have the same positive number of classes, got shapes ",
                   query_labels.sizes(), " and ", gallery_labels.sizes());
  const int64_t words = (c + 63) / 64;
  return {true, pack_label_bits(query_labels, words), pack_label_bits(gallery_labels, words)};
}

retrieval::Divisor parse_divisor(const char* op, std::string_view divisor) {
  if (divisor == "retrieved") return retrieval::Divisor::Retrieved;
  if (divisor == "relevant") return retrieval::Divisor::Relevant;
  SDML_CHECK_VALUE(false, op, ": divisor must be \"retrieved\" (relevant items within k, the authors' rule) or "
                   "\"relevant\" (all relevant items, the TREC rule), got \"", divisor, "\"");
  return retrieval::Divisor::Retrieved;
}

retrieval::Empty parse_empty(const char* op, std::string_view empty) {
  if (empty == "zero") return retrieval::Empty::Zero;
  if (empty == "skip") return retrieval::Empty::Skip;
  SDML_CHECK_VALUE(false, op, ": empty must be \"zero\" (a query without relevant items scores 0) or \"skip\" "
                   "(it gets NaN and means leave it out), got \"", empty, "\"");
  return retrieval::Empty::Zero;
}

int64_t resolve_k(const char* op, std::optional<int64_t> k, int64_t ranked) {
  if (!k.has_value()) return ranked;
  SDML_CHECK_VALUE(*k > 0, op, ": k must be positive (or None for all items), got ", *k);
  return *k < ranked ? *k : ranked;
}

void check_cutoffs(const char* op, at::IntArrayRef ks) {
  SDML_CHECK_VALUE(!ks.empty(), op, ": ks must list at least one cut-off");
  for (const int64_t K : ks) SDML_CHECK_VALUE(K > 0, op, ": ks must be positive, got ", K);
}

void check_recall_levels(const char* op, at::ArrayRef<double> levels) {
  SDML_CHECK_VALUE(!levels.empty(), op, ": recall_levels must list at least one level");
  for (const double L : levels)
    SDML_CHECK_VALUE(std::isfinite(L) && L >= 0.0 && L <= 1.0, op, ": recall_levels must lie in [0, 1], got ", L);
}

}  // namespace sdml
