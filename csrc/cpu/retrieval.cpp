// CPU entry points of the retrieval ops: each validates and sizes its arguments first
// (retrieval_prologue), allocates its outputs, and runs the tiled kernels of csrc/cpu/retrieval/,
// one concept per header:
//   tiles.h             query tiles taken by the threads from a shared counter; gallery ranges
//   block_gemm.h        the GEMM of one block of scores (oneDNN or BLAS)
//   packed_gallery.h    the gallery packed once for MKL's GEMM (the metric tiles, float32)
//   duplicate_scores.h  exact duplicates of a gallery row get their first row's score
//   running_topk.h      the best k of one query's scores so far (cosine_topk)
//   topk.h              cosine_topk over tiles and gallery ranges
//   topk_bf16.cpp       cosine_topk's precision="bf16": bf16 candidates, re-scored exactly, with
//     bf16_rows.h         the bf16 copies of the rows and their rounding terms (the bound)
//     margin_candidates.h a query's candidates above the bound's threshold
//     exact_dots.h        the exact kernel's GEMM arithmetic, pair by pair, and its probe
//     rank_keys.h         the exact mode's order of re-scored candidates as sortable integers
//   relevance.h         which gallery items are relevant to a query (class ids or label bits)
//   avx512.h            whether the hand-written AVX-512 paths run (SDML_CPU_AVX512=off: not)
//   relevant_index.h    a query's relevant items: buckets, the table of relevant items ahead
//   count_items.h       the pass over all items: counts per relevant interval, the candidates
//   candidates.h        the candidates compared exactly with their bucket's relevant items
//   relevant_ranker.h   the exact ranks of a query's relevant items, without a full sort
//   query_ranks.h       tiles scored and ranked, per query (the metric ops)
// Similarities are computed tile by tile, never as the full Nq x Ng matrix; the results do not
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "retrieval/duplicate_scores.h"
#include "retrieval/query_ranks.h"
#include "retrieval/relevance.h"
#include "retrieval/topk.h"
#include "sdml/checks.h"
#include "sdml/host_buffers.h"
#include "sdml/retrieval.h"
#include "sdml/topk_precision.h"

namespace sdml {
namespace {

using namespace retrieval;
using namespace cpu_retrieval;

void check_cpu_dtype(const char* op, const at::Tensor& query) {
  TORCH_CHECK_TYPE(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble, op,
                   ": on CPU query must be float32 or float64, got ", query.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                   int64_t k, bool exclude_self, c10::string_view precision) {
  constexpr const char* op = "cosine_topk";
  const RetrievalSizes sizes = retrieval_prologue(op, query_in, gallery_in, exclude_self);
  check_cpu_dtype(op, query_in);
  check_topk_k(op, k, sizes.ranked, exclude_self);
  if (use_cpu_bf16_topk(op, query_in, precision)) return cosine_topk_bf16_cpu(query_in, gallery_in, k, exclude_self);
  // The exact mode itself: where bf16 units make a first pass cheap, it filters the candidates
  // and re-scores them in this kernel's own arithmetic (or runs this kernel): the same answer.
  if (use_cpu_bf16_filter(query_in, sizes.ng))
    return cosine_topk_bf16_cpu(query_in, gallery_in, k, exclude_self, /*as_filter=*/true);
  const auto [query, raw_gallery, gallery_norms] = embeddings_with_gallery_norms(op, query_in, gallery_in, exclude_self);
  const DuplicateScores duplicates(duplicate_rows(gallery_in));
  at::Tensor scores = at::empty({sizes.nq, k}, query.options());
  at::Tensor indices = at::empty({sizes.nq, k}, query.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "cosine_topk_cpu", [&] {
    topk_tiles<scalar_t>(query, raw_gallery, gallery_norms, duplicates, k, exclude_self,
                         scores.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>());
  });
  return {scores, indices};
}

// ---- the ranks of the relevant items ---------------------------------------------------------

// The CPU ranker counts and lists gallery items with 32-bit integers (relevant_ranker.h).
void check_rankable(const char* op, const char* name, int64_t rows) {
  SDML_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), op, ": ", name, " has ", rows,
                   " rows; the CPU ranking metrics take at most 2^31 - 1 gallery items");
}

// Runs consume over every query's relevant ranks (arguments already through retrieval_prologue).
template <typename Consume>
void rank_relevant(const char* op, const at::Tensor& query_in, const at::Tensor& gallery_in,
                   const at::Tensor& query_labels, const at::Tensor& gallery_labels, bool exclude_self,
                   const Consume& consume) {
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  const RetrievalLabels labels = prepare_labels(op, query_labels, gallery_labels, query, gallery);
  const DuplicateScores duplicates(duplicate_rows(gallery_in));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "rank_relevant_cpu", [&] {
    with_relevance(labels, false, [&](const auto& relevance) {
      for_each_query_ranks<scalar_t>(query, gallery, duplicates, relevance, exclude_self, consume);
    });
  });
}

// ---- the metric ops --------------------------------------------------------------------------

// AP@cutoff of each query into out[qi], from the ranks of its relevant items.
struct AveragePrecisionOf {
  int64_t cutoff;
  Divisor divisor;
  Empty empty;
  double* out;
  void operator()(int64_t qi, const std::vector<int64_t>& ranks) const {
    double sum = 0;
    int64_t r = 0;
    for (; r < int64_t(ranks.size()) && ranks[r] <= cutoff; ++r) sum += precision_term(r + 1, ranks[r]);
    out[qi] = average_precision_from(sum, r, ranks.size(), divisor, empty);
  }
};

at::Tensor average_precision_cpu(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_labels,
                                 const at::Tensor& gallery_labels, std::optional<int64_t> k,
                                 c10::string_view divisor_name, c10::string_view empty_name, bool exclude_self) {
  constexpr const char* op = "average_precision";
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, query_labels, gallery_labels, exclude_self);
  check_cpu_dtype(op, query);
  check_rankable(op, "gallery", sizes.ng);
  const Divisor divisor = parse_divisor(op, divisor_name);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t cutoff = resolve_k(op, k, sizes.ranked);
  at::Tensor ap = at::empty({sizes.nq}, query.options().dtype(at::kDouble));
  rank_relevant(op, query, gallery, query_labels, gallery_labels, exclude_self,
                AveragePrecisionOf{cutoff, divisor, empty, ap.mutable_data_ptr<double>()});
  return ap;
}

// Both directions of a cross-modal pair from one similarity computation: the scores of a's
// queries against b (tiles of [rows, Nb]) are ranked, and kept transposed as the [Nb, Na]
// scores of b's queries against a, ranked afterwards.
std::tuple<at::Tensor, at::Tensor> average_precision_pair_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                                                              const at::Tensor& a_labels, const at::Tensor& b_labels,
                                                              std::optional<int64_t> k, c10::string_view divisor_name,
                                                              c10::string_view empty_name) {
  constexpr const char* op = "average_precision_pair";
  const RetrievalSizes sizes = retrieval_prologue(op, a_in, b_in, a_labels, b_labels, /*exclude_self=*/false);
  check_cpu_dtype(op, a_in);
  SDML_CHECK_VALUE(sizes.nq > 0, op, ": a has no rows (nothing to rank for b's queries)");
  check_rankable(op, "a", sizes.nq);
  check_rankable(op, "b", sizes.ng);
  const Divisor divisor = parse_divisor(op, divisor_name);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t na = sizes.nq, nb = sizes.ng;
  auto [a, b] = normalized_embeddings(op, a_in, b_in, /*exclude_self=*/false);
  const RetrievalLabels labels = prepare_labels(op, a_labels, b_labels, a, b);
  const int64_t cutoff_ab = resolve_k(op, k, nb), cutoff_ba = resolve_k(op, k, na);
  const DuplicateScores b_duplicates(duplicate_rows(b_in)), a_duplicates(duplicate_rows(a_in));
  at::Tensor ap_ab = at::empty({na}, a.options().dtype(at::kDouble));
  at::Tensor ap_ba = at::empty({nb}, a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "average_precision_pair_cpu", [&] {
    at::Tensor scores_ba = empty_large_cpu({nb, na}, a.options());
    scalar_t* ba = scores_ba.mutable_data_ptr<scalar_t>();
    with_relevance(labels, false, [&](const auto& relevance) {
      for_each_query_ranks<scalar_t>(a, b, b_duplicates, relevance, false,
                                     AveragePrecisionOf{cutoff_ab, divisor, empty, ap_ab.mutable_data_ptr<double>()},
                                     ba);
    });
    with_relevance(labels, true, [&](const auto& relevance) {
      for_each_row_ranks<scalar_t>(ba, nb, na, a_duplicates, relevance,
                                   AveragePrecisionOf{cutoff_ba, divisor, empty, ap_ba.mutable_data_ptr<double>()});
    });
  });
  return {ap_ab, ap_ba};
}

at::Tensor precision_at_k_cpu(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_labels,
                              const at::Tensor& gallery_labels, at::IntArrayRef k, c10::string_view empty_name,
                              bool exclude_self) {
  constexpr const char* op = "precision_at_k";
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, query_labels, gallery_labels, exclude_self);
  check_cpu_dtype(op, query);
  check_rankable(op, "gallery", sizes.ng);
  check_cutoffs(op, k);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t ranked = sizes.ranked, nk = k.size();
  const std::vector<int64_t> cutoffs(k.begin(), k.end());
  at::Tensor prec = at::empty({sizes.nq, nk}, query.options().dtype(at::kDouble));
  double* out = prec.mutable_data_ptr<double>();
  rank_relevant(op, query, gallery, query_labels, gallery_labels, exclude_self,
                [&](int64_t qi, const std::vector<int64_t>& ranks) {
                  for (int64_t j = 0; j < nk; ++j) {
                    const int64_t hits = std::upper_bound(ranks.begin(), ranks.end(), cutoffs[j]) - ranks.begin();
                    out[qi * nk + j] = ranks.empty() ? empty_value(empty) : precision_at(hits, cutoffs[j], ranked);
                  }
                });
  return prec;
}

at::Tensor precision_recall_curve_cpu(const at::Tensor& query, const at::Tensor& gallery,
                                      const at::Tensor& query_labels, const at::Tensor& gallery_labels,
                                      at::ArrayRef<double> recall_levels, c10::string_view empty_name,
                                      bool exclude_self) {
  constexpr const char* op = "precision_recall_curve";
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, query_labels, gallery_labels, exclude_self);
  check_cpu_dtype(op, query);
  check_rankable(op, "gallery", sizes.ng);
  check_recall_levels(op, recall_levels);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t nl = recall_levels.size();
  const std::vector<double> levels(recall_levels.begin(), recall_levels.end());
  at::Tensor prec = at::empty({sizes.nq, nl}, query.options().dtype(at::kDouble));
  double* out = prec.mutable_data_ptr<double>();
  rank_relevant(op, query, gallery, query_labels, gallery_labels, exclude_self,
                [&](int64_t qi, const std::vector<int64_t>& ranks) {
                  const int64_t R = ranks.size();
                  // best[h - 1] = max precision over the h-th and later relevant items.
                  thread_local std::vector<double> best;
                  best.resize(R);
                  double running = 0;
                  for (int64_t h = R; h >= 1; --h) best[h - 1] = running = std::max(running, precision_term(h, ranks[h - 1]));
                  for (int64_t j = 0; j < nl; ++j)
                    out[qi * nl + j] = R == 0 ? empty_value(empty) : best[first_reaching(levels[j], R) - 1];
                });
  return prec;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CPU, m) {
  m.impl("cosine_topk", &cosine_topk_cpu);
  m.impl("average_precision", &average_precision_cpu);
  m.impl("average_precision_pair", &average_precision_pair_cpu);
  m.impl("precision_at_k", &precision_at_k_cpu);
  m.impl("precision_recall_curve", &precision_recall_curve_cpu);
}

}  // namespace sdml
