// Argument validation and input preparation shared by the CPU and CUDA retrieval kernels:
// normalized embeddings, labels in kernel form (class ids or packed label bits), options.
#include "sdml/retrieval.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
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

// Row norms [N, 1] of t, checked.
at::Tensor row_norms(const char* op, const char* name, const at::Tensor& t) {
  const at::Tensor norms = at::linalg_vector_norm(t, 2, {1}, /*keepdim=*/true);
  check_row_norms(op, name, norms);
  return norms;
}

at::Tensor normalize_rows(const char* op, const char* name, const at::Tensor& input) {
  const at::Tensor t = input.detach();
  return at::div(t, row_norms(op, name, t)).contiguous();
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

// A hash of a row's values (-0 counted as +0): equal rows hash equal.
template <typename T>
uint64_t row_hash(const T* row, int64_t d) {
  uint64_t h = 0;
  for (int64_t j = 0; j < d; ++j) {
    const T v = row[j] + T(0);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    h += bits * ((uint64_t(j) + 1) * 0x9E3779B97F4A7C15ull | 1);
  }
  return h ^ (h >> 29);
}

// CPU: rows grouped by hash, equal hashes compared exactly (O(Ng d), no large temporaries).
DuplicateRows duplicate_rows_cpu(const at::Tensor& gallery_in) {
  const at::Tensor gallery = gallery_in.contiguous();
  const int64_t n = gallery.size(0), d = gallery.size(1);
  std::vector<std::pair<uint64_t, int64_t>> keyed(n);
  std::vector<int64_t> dup, rep;
  AT_DISPATCH_FLOATING_TYPES(gallery.scalar_type(), "duplicate_rows", [&] {
    const scalar_t* g = gallery.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) keyed[t] = {row_hash(g + t * d, d), t};
    });
    std::sort(keyed.begin(), keyed.end());
    std::vector<int64_t> firsts;  // distinct rows seen in the current run of equal hashes
    for (int64_t a = 0; a < n;) {
      int64_t b = a + 1;
      while (b < n && keyed[b].first == keyed[a].first) ++b;
      firsts.clear();
      for (int64_t i = a; i < b; ++i) {  // ascending index within the run
        const int64_t t = keyed[i].second;
        const auto same = std::find_if(firsts.begin(), firsts.end(), [&](int64_t f) {
          return std::equal(g + t * d, g + (t + 1) * d, g + f * d);
        });
        if (same == firsts.end()) {
          firsts.push_back(t);
        } else {
          dup.push_back(t);
          rep.push_back(*same);
        }
      }
      a = b;
    }
  });
  std::vector<int64_t> order(dup.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return dup[a] < dup[b]; });
  at::Tensor dups = at::empty({int64_t(dup.size())}, at::kLong), reps = at::empty_like(dups);
  for (size_t i = 0; i < order.size(); ++i) {
    dups.data_ptr<int64_t>()[i] = dup[order[i]];
    reps.data_ptr<int64_t>()[i] = rep[order[i]];
  }
  return {dups, reps};
}

}  // namespace

DuplicateRows duplicate_rows(const at::Tensor& gallery) {
  if (gallery.device().is_cpu()) return duplicate_rows_cpu(gallery);
  // Other devices: sort the rows (unique_dim), then the first index of each distinct row.
  const int64_t n = gallery.size(0);
  const auto [values, inverse, counts] = at::unique_dim(gallery.detach(), 0, /*sorted=*/true, /*return_inverse=*/true);
  const at::Tensor index = at::arange(n, inverse.options());
  const at::Tensor first = at::full({values.size(0)}, n, inverse.options())
                               .scatter_reduce(0, inverse, index, "amin", /*include_self=*/true);
  const at::Tensor rep_of = first.index_select(0, inverse);
  const at::Tensor dup = at::nonzero(rep_of.ne(index)).view({-1});
  return {dup, rep_of.index_select(0, dup)};
}

static void check_embeddings(const char* op, const at::Tensor& query, const at::Tensor& gallery, bool exclude_self) {
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
}

std::pair<at::Tensor, at::Tensor> normalized_embeddings(const char* op, const at::Tensor& query,
                                                        const at::Tensor& gallery, bool exclude_self) {
  check_embeddings(op, query, gallery, exclude_self);
  return {normalize_rows(op, "query", query), normalize_rows(op, "gallery", gallery)};
}

EmbeddingsWithGalleryNorms embeddings_with_gallery_norms(const char* op, const at::Tensor& query,
                                                         const at::Tensor& gallery, bool exclude_self) {
  check_embeddings(op, query, gallery, exclude_self);
  const at::Tensor q = normalize_rows(op, "query", query), g = gallery.detach().contiguous();
  return {q, g, row_norms(op, "gallery", g)};
}

// The labels' devices, ranks and row counts, for checked embeddings query and gallery.
static void check_label_shapes(const char* op, const at::Tensor& query_labels, const at::Tensor& gallery_labels,
                               const at::Tensor& query, const at::Tensor& gallery) {
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
}

RetrievalSizes retrieval_prologue(const char* op, const at::Tensor& query, const at::Tensor& gallery,
                                  bool exclude_self) {
  check_embeddings(op, query, gallery, exclude_self);
  const int64_t ng = gallery.size(0);
  return {query.size(0), ng, query.size(1), ranked_items(ng, exclude_self)};
}

RetrievalSizes retrieval_prologue(const char* op, const at::Tensor& query, const at::Tensor& gallery,
                                  const at::Tensor& query_labels, const at::Tensor& gallery_labels,
                                  bool exclude_self) {
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, exclude_self);
  check_label_shapes(op, query_labels, gallery_labels, query, gallery);
  return sizes;
}

RetrievalLabels prepare_labels(const char* op, const at::Tensor& query_labels,
                               const at::Tensor& gallery_labels, const at::Tensor& query,
                               const at::Tensor& gallery) {
  check_label_shapes(op, query_labels, gallery_labels, query, gallery);
  const int64_t qd = query_labels.dim();
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

void check_topk_k(const char* op, int64_t k, int64_t ranked, bool exclude_self) {
  SDML_CHECK_VALUE(k > 0, op, ": k must be positive, got ", k);
  SDML_CHECK_VALUE(k <= ranked, op, ": k = ", k, " exceeds the ", ranked, " gallery items each query ranks",
                   exclude_self ? " (exclude_self leaves out the query itself)" : "");
}

void check_cutoffs(const char* op, at::IntArrayRef k) {
  SDML_CHECK_VALUE(!k.empty(), op, ": k must list at least one cut-off");
  for (const int64_t K : k) SDML_CHECK_VALUE(K > 0, op, ": every cut-off in k must be positive, got ", K);
}

void check_recall_levels(const char* op, at::ArrayRef<double> levels) {
  SDML_CHECK_VALUE(!levels.empty(), op, ": recall_levels must list at least one level");
  for (const double L : levels)
    SDML_CHECK_VALUE(std::isfinite(L) && L >= 0.0 && L <= 1.0, op, ": recall_levels must lie in [0, 1], got ", L);
}

}  // namespace sdml
