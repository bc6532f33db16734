// CPU kernels of the retrieval ops. Similarities are computed tile by tile with a GEMM
// (at::mm_out into a per-thread buffer, never the full Nq x Ng matrix); query tiles run in
// parallel, one thread per tile, so the GEMM inside runs single-threaded on its own tile.
//
// cosine_topk keeps a running top-k per query (a candidate buffer pruned with nth_element).
// The ranking metrics need, per query, the exact rank of every relevant item. Instead of a
// full sort, the row's scores are bucketed (a monotone map of [min, max] onto B buckets): an
// item in a higher bucket always scores higher, so a histogram gives each relevant item the
// count of items above its bucket, and only items sharing a bucket with a relevant item are
// compared exactly (score, then ascending index). See sdml/retrieval_math.h for the metrics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "sdml/checks.h"
#include "sdml/retrieval.h"

namespace sdml {
namespace {

using namespace retrieval;

// Bytes of one thread's score tile: large enough for GEMM efficiency, small enough to stay in
// the last-level cache share of a thread.
constexpr int64_t kTileBytes = 8 << 20;
constexpr int64_t kMinTileRows = 8, kMaxTileRows = 256;
// Gallery columns per GEMM block of cosine_topk.
constexpr int64_t kTopkBlockCols = 2048;

int64_t tile_rows(int64_t cols, size_t elem) {
  return std::clamp<int64_t>(kTileBytes / std::max<int64_t>(cols * int64_t(elem), 1), kMinTileRows, kMaxTileRows);
}

void check_cpu_dtype(const char* op, const at::Tensor& query) {
  TORCH_CHECK_TYPE(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble, op,
                   ": on CPU query must be float32 or float64, got ", query.scalar_type());
}

// ---- cosine_topk ---------------------------------------------------------------------------

// Order of ranked items: higher score first, equal scores by ascending gallery index.
template <typename T>
struct Scored {
  T score;
  int64_t index;
  bool operator<(const Scored& o) const { return score > o.score || (score == o.score && index < o.index); }
};

// The best k of the items offered so far, in the ranking order.
template <typename T>
class RunningTopK {
 public:
  explicit RunningTopK(int64_t k) : k_(k) { cand_.reserve(2 * k); }

  void reset() {
    cand_.clear();
    threshold_ = -std::numeric_limits<T>::infinity();
  }

  // Offers scores s[0, n) of gallery items base, base + 1, ...; `self` is never kept.
  SDML_CPU_CLONES void offer_block(const T* s, int64_t n, int64_t base, int64_t self) {
    constexpr int64_t kChunk = 16;
    int64_t t = 0;
    for (; t + kChunk <= n; t += kChunk) {
      // Later items lose ties, so only a strictly higher score than the k-th best enters.
      T m = s[t];
#pragma omp simd reduction(max : m)
      for (int64_t j = 1; j < kChunk; ++j) m = s[t + j] > m ? s[t + j] : m;
      if (m <= threshold_) continue;
      for (int64_t j = 0; j < kChunk; ++j) offer(s[t + j], base + t + j, self);
    }
    for (; t < n; ++t) offer(s[t], base + t, self);
  }

  // Writes the kept items best first (min(k, offered) of them).
  void finish(T* scores, int64_t* indices) {
    prune();
    std::sort(cand_.begin(), cand_.end());
    for (size_t j = 0; j < cand_.size(); ++j) {
      scores[j] = cand_[j].score;
      indices[j] = cand_[j].index;
    }
  }

 private:
  void offer(T v, int64_t index, int64_t self) {
    if (v <= threshold_ || index == self) return;
    cand_.push_back({v, index});
    if (int64_t(cand_.size()) == 2 * k_) prune();
  }

  void prune() {
    if (int64_t(cand_.size()) <= k_) return;
    std::nth_element(cand_.begin(), cand_.begin() + (k_ - 1), cand_.end());
    cand_.resize(k_);
    threshold_ = cand_[k_ - 1].score;
  }

  int64_t k_;
  std::vector<Scored<T>> cand_;
  T threshold_ = -std::numeric_limits<T>::infinity();
};

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                   int64_t k, bool exclude_self) {
  constexpr const char* op = "cosine_topk";
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  check_cpu_dtype(op, query);
  const int64_t nq = query.size(0), ng = gallery.size(0), ranked = ranked_items(ng, exclude_self);
  SDML_CHECK_VALUE(k > 0, op, ": k must be positive, got ", k);
  SDML_CHECK_VALUE(k <= ranked, op, ": k = ", k, " exceeds the ", ranked, " gallery items each query ranks",
                   exclude_self ? " (exclude_self leaves out the query itself)" : "");
  at::Tensor scores = at::empty({nq, k}, query.options());
  at::Tensor indices = at::empty({nq, k}, query.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "cosine_topk_cpu", [&] {
    const int64_t rows = tile_rows(kTopkBlockCols, sizeof(scalar_t));
    const int64_t tiles = (nq + rows - 1) / rows;
    at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      at::Tensor buffer = at::empty({rows * kTopkBlockCols}, query.options());
      std::vector<RunningTopK<scalar_t>> best(rows, RunningTopK<scalar_t>(k));
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
        const at::Tensor q_tile = query.narrow(0, q0, nrows);
        for (int64_t i = 0; i < nrows; ++i) best[i].reset();
        for (int64_t g0 = 0; g0 < ng; g0 += kTopkBlockCols) {
          const int64_t ncols = std::min(kTopkBlockCols, ng - g0);
          at::Tensor block = buffer.narrow(0, 0, nrows * ncols).view({nrows, ncols});
          at::mm_out(block, q_tile, gallery.narrow(0, g0, ncols).t());
          const scalar_t* s = block.const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < nrows; ++i)
            best[i].offer_block(s + i * ncols, ncols, g0, exclude_self ? q0 + i : -1);
        }
        for (int64_t i = 0; i < nrows; ++i)
          best[i].finish(scores.mutable_data_ptr<scalar_t>() + (q0 + i) * k,
                         indices.mutable_data_ptr<int64_t>() + (q0 + i) * k);
      }
    });
  });
  return {scores, indices};
}

// ---- relevance -----------------------------------------------------------------------------

// Single-label: gallery items with the query's class id; -1 matches nothing.
class ClassIdRelevance {
 public:
  ClassIdRelevance(const at::Tensor& query, const at::Tensor& gallery)
      : query_(query.const_data_ptr<int64_t>()), order_(gallery.size(0)), class_of_(gallery.size(0)) {
    const int64_t* g = gallery.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < int64_t(order_.size()); ++t) order_[t] = t;
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return g[a] < g[b]; });
    for (size_t j = 0; j < order_.size(); ++j) class_of_[j] = g[order_[j]];
  }

  // The relevant gallery items of query qi (ascending), less `self`.
  void collect(int64_t qi, int64_t self, std::vector<int64_t>& out) const {
    out.clear();
    const int64_t c = query_[qi];
    if (c < 0) return;
    const auto [lo, hi] = std::equal_range(class_of_.begin(), class_of_.end(), c);
    for (auto it = lo; it != hi; ++it) {
      const int64_t t = order_[it - class_of_.begin()];
      if (t != self) out.push_back(t);
    }
  }

 private:
  const int64_t* query_;
  std::vector<int64_t> order_;     // gallery indices sorted by class id, then index
  std::vector<int64_t> class_of_;  // class id of order_[j]
};

// Multi-label: gallery items sharing at least one class bit with the query.
class LabelBitsRelevance {
 public:
  LabelBitsRelevance(const at::Tensor& query, const at::Tensor& gallery)
      : query_(reinterpret_cast<const uint64_t*>(query.const_data_ptr<int64_t>())),
        gallery_(reinterpret_cast<const uint64_t*>(gallery.const_data_ptr<int64_t>())),
        words_(query.size(1)),
        rows_(gallery.size(0)) {}

  void collect(int64_t qi, int64_t self, std::vector<int64_t>& out) const {
    const uint64_t* q = query_ + qi * words_;
    out.resize(rows_);
    int64_t n = 0;
    if (words_ == 1) {
      const uint64_t q0 = q[0];
      for (int64_t t = 0; t < rows_; ++t) {  // branch-free compaction
        out[n] = t;
        n += (gallery_[t] & q0) != 0;
      }
    } else {
      for (int64_t t = 0; t < rows_; ++t) {
        uint64_t any = 0;
        for (int64_t w = 0; w < words_; ++w) any |= gallery_[t * words_ + w] & q[w];
        out[n] = t;
        n += any != 0;
      }
    }
    out.resize(n);
    if (self >= 0) out.erase(std::remove(out.begin(), out.end(), self), out.end());
  }

 private:
  const uint64_t* query_;
  const uint64_t* gallery_;
  int64_t words_, rows_;
};

// ---- exact ranks of the relevant items of one query -------------------------------------------

template <typename T>
class RelevantRanker {
 public:
  explicit RelevantRanker(int64_t n) : n_(n), buckets_(bucket_count(n)), bucket_of_(n),
                                       hist_(buckets_), group_start_(buckets_ + 1) {}

  // Ranks (1-based, ascending) of the relevant items `rel` (gallery indices, not containing
  // `self`) in the ranking of scores s[0, n) that leaves out item `self` (-1: none).
  SDML_CPU_CLONES const std::vector<int64_t>& rank(const T* s, const std::vector<int64_t>& rel, int64_t self) {
    ranks_.clear();
    const int64_t R = rel.size();
    if (R == 0) return ranks_;
    T lo = s[0], hi = s[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t t = 0; t < n_; ++t) {
      lo = s[t] < lo ? s[t] : lo;
      hi = s[t] > hi ? s[t] : hi;
    }
    // A monotone map: s_a <= s_b implies bucket(a) <= bucket(b).
    const T scale = hi > lo ? T(buckets_) / (hi - lo) : T(0);
    const int32_t last = int32_t(buckets_ - 1);
    int32_t* bucket_of = bucket_of_.data();
#pragma omp simd
    for (int64_t t = 0; t < n_; ++t) {
      const int32_t b = int32_t((s[t] - lo) * scale);
      bucket_of[t] = b < last ? b : last;
    }

    // The relevant items grouped by bucket (a counting sort).
    std::fill(group_start_.begin(), group_start_.end(), 0);
    for (const int64_t t : rel) ++group_start_[bucket_of[t] + 1];
    for (int64_t b = 0; b < buckets_; ++b) group_start_[b + 1] += group_start_[b];
    group_.resize(R);
    {
      std::vector<int32_t>& fill = hist_;  // reused as the per-bucket write cursor
      std::copy(group_start_.begin(), group_start_.end() - 1, fill.begin());
      for (const int64_t t : rel) group_[fill[bucket_of[t]]++] = {s[t], t};
    }
    ahead_.assign(R, 0);

    // Histogram of all ranked items; exact comparisons only inside buckets holding relevant items.
    std::fill(hist_.begin(), hist_.end(), 0);
    const int32_t* start = group_start_.data();
    for (int64_t t = 0; t < n_; ++t) {
      const int32_t b = bucket_of[t];
      ++hist_[b];
      if (start[b] == start[b + 1]) continue;
      if (t == self) continue;
      const T v = s[t];
      for (int32_t m = start[b]; m < start[b + 1]; ++m)
        ahead_[m] += v > group_[m].score || (v == group_[m].score && t < group_[m].index);
    }
    if (self >= 0) --hist_[bucket_of[self]];

    // Buckets from the top: rank = 1 + items in higher buckets + items ahead in the bucket.
    int64_t above = 0;
    for (int64_t b = buckets_ - 1; b >= 0; --b) {
      const size_t first = ranks_.size();
      for (int32_t m = start[b]; m < start[b + 1]; ++m) ranks_.push_back(1 + above + ahead_[m]);
      std::sort(ranks_.begin() + first, ranks_.end());
      above += hist_[b];
    }
    return ranks_;
  }

 private:
  // About one bucket per item (a power of two in [64, 65536]).
  static int64_t bucket_count(int64_t n) {
    int64_t b = 64;
    while (b < n && b < (int64_t{1} << 16)) b <<= 1;
    return b;
  }

  int64_t n_, buckets_;
  std::vector<int32_t> bucket_of_, hist_, group_start_;
  std::vector<Scored<T>> group_;
  std::vector<int64_t> ahead_, ranks_;
};

// Calls consume(qi, ranks, total_relevant) for every query, ranks as RelevantRanker::rank.
template <typename T, typename Relevance, typename Consume>
void for_each_query_ranks(const at::Tensor& query, const at::Tensor& gallery, const Relevance& relevance,
                          bool exclude_self, const Consume& consume) {
  const int64_t nq = query.size(0), ng = gallery.size(0);
  const int64_t rows = tile_rows(ng, sizeof(T));
  const int64_t tiles = (nq + rows - 1) / rows;
  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    at::Tensor buffer = at::empty({rows * ng}, query.options());
    RelevantRanker<T> ranker(ng);
    std::vector<int64_t> rel;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
      at::Tensor block = buffer.narrow(0, 0, nrows * ng).view({nrows, ng});
      at::mm_out(block, query.narrow(0, q0, nrows), gallery.t());
      const T* s = block.const_data_ptr<T>();
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t qi = q0 + i, self = exclude_self ? qi : -1;
        relevance.collect(qi, self, rel);
        consume(qi, ranker.rank(s + i * ng, rel, self));
      }
    }
  });
}

// Validates the common arguments and runs consume over every query's relevant ranks.
template <typename Consume>
void rank_relevant(const char* op, const at::Tensor& query_in, const at::Tensor& gallery_in,
                   const at::Tensor& query_labels, const at::Tensor& gallery_labels, bool exclude_self,
                   const Consume& consume) {
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  check_cpu_dtype(op, query);
  const RetrievalLabels labels = prepare_labels(op, query_labels, gallery_labels, query, gallery);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "rank_relevant_cpu", [&] {
    if (labels.multi_hot) {
      for_each_query_ranks<scalar_t>(query, gallery, LabelBitsRelevance(labels.query, labels.gallery),
                                     exclude_self, consume);
    } else {
      for_each_query_ranks<scalar_t>(query, gallery, ClassIdRelevance(labels.query, labels.gallery),
                                     exclude_self, consume);
    }
  });
}

// ---- the metric ops --------------------------------------------------------------------------

at::Tensor average_precision_cpu(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_labels,
                                 const at::Tensor& gallery_labels, std::optional<int64_t> k,
                                 c10::string_view divisor_name, c10::string_view empty_name, bool exclude_self) {
  constexpr const char* op = "average_precision";
  const Divisor divisor = parse_divisor(op, divisor_name);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t cutoff = resolve_k(op, k, ranked_items(gallery.size(0), exclude_self));
  at::Tensor ap = at::empty({query.size(0)}, query.options().dtype(at::kDouble));
  double* out = ap.mutable_data_ptr<double>();
  rank_relevant(op, query, gallery, query_labels, gallery_labels, exclude_self,
                [&](int64_t qi, const std::vector<int64_t>& ranks) {
                  double sum = 0;
                  int64_t r = 0;
                  for (; r < int64_t(ranks.size()) && ranks[r] <= cutoff; ++r) sum += precision_term(r + 1, ranks[r]);
                  out[qi] = average_precision_from(sum, r, ranks.size(), divisor, empty);
                });
  return ap;
}

at::Tensor precision_at_k_cpu(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_labels,
                              const at::Tensor& gallery_labels, at::IntArrayRef ks, c10::string_view empty_name,
                              bool exclude_self) {
  constexpr const char* op = "precision_at_k";
  check_cutoffs(op, ks);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t ranked = ranked_items(gallery.size(0), exclude_self), nk = ks.size();
  const std::vector<int64_t> cutoffs(ks.begin(), ks.end());
  at::Tensor prec = at::empty({query.size(0), nk}, query.options().dtype(at::kDouble));
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
  check_recall_levels(op, recall_levels);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t nl = recall_levels.size();
  const std::vector<double> levels(recall_levels.begin(), recall_levels.end());
  at::Tensor prec = at::empty({query.size(0), nl}, query.options().dtype(at::kDouble));
  double* out = prec.mutable_data_ptr<double>();
  rank_relevant(op, query, gallery, query_labels, gallery_labels, exclude_self,
                [&](int64_t qi, const std::vector<int64_t>& ranks) {
                  const int64_t R = ranks.size();
                  // best[h - 1] = max precision over the h-th and later relevant items.
                  thread_local std::vector<double> best;
                  best.resize(R);
                  double running = 0;
                  for (int64_t h = R; h >= 1; --h) best[h - 1] = running = std::max(running, precision_term(h, ranks[h - 1]));
                  for (int64_t j = 0; j < nl; ++j) {
                    if (R == 0) {
                      out[qi * nl + j] = empty_value(empty);
                      continue;
                    }
                    // The first h reaching the level (h = R always does), from its estimate L * R.
                    int64_t h = std::clamp<int64_t>(int64_t(std::ceil(levels[j] * R)), 1, R);
                    while (h > 1 && reaches_recall(h - 1, R, levels[j])) --h;
                    while (!reaches_recall(h, R, levels[j])) ++h;
                    out[qi * nl + j] = best[h - 1];
                  }
                });
  return prec;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CPU, m) {
  m.impl("cosine_topk", &cosine_topk_cpu);
  m.impl("average_precision", &average_precision_cpu);
  m.impl("precision_at_k", &precision_at_k_cpu);
  m.impl("precision_recall_curve", &precision_recall_curve_cpu);
}

}  // namespace sdml
