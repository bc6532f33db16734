// cosine_topk, precision="bf16", on the CPU: the exact mode's answer from a bf16 first pass.
//
// 1. Scores in bf16: each thread takes a tile of query rows and runs at::mm on bf16 copies of
//    the normalized query tile and gallery blocks (oneDNN: AMX / AVX512-BF16 units), single-
//    threaded inside the parallel region like the exact kernel's tiles.
// 2. Candidates: per query, every ranked item whose bf16 score is >= kappa - 2 delta, where kappa
//    is the k-th best bf16 score and delta = bf16_score_bound(d) bounds |s_bf16 - s_exact| for
//    each item. Every item of the exact mode's top k is among them: the k items with the best
//    bf16 scores have s_exact >= kappa - delta, so the exact k-th score is >= kappa - delta, and an
//    item that reaches it has s_bf16 >= s_exact - delta >= kappa - 2 delta. A running kappa (which
//    only rises) prunes the list as the blocks come.
// 3. Re-scoring: the candidates of groups of kGroupRows queries are gathered and scored in float32
//    by the same block GEMM as the exact mode (the library the process chose, sdml/cpu_gemm.h:
//    oneDNN or MKL/BLAS), and ranked like the exact mode (higher score, then lower index).
//
// Where the candidates would be dense (a large k in a crowded score range: more than Ng / 64 per
// query on a probe), gathering them costs more than the exact GEMM, and the exact kernel runs.
//
// When is the answer bitwise the exact mode's? Whenever the re-score rounds each product as the
// exact kernel's GEMM did. oneDNN's fp32 kernels round a product the same wherever it sits in a
// call, for calls of >= 3 rows and >= 5 columns; narrower calls take another path (measured; the
// tests compare every mode on such shapes). So the re-score calls are padded to >= 4 x 8, and the
// exact kernel's narrow calls are mirrored: a last gallery block of 1-4 items (Ng mod 1024) is
// re-scored in one call of that width, and the queries of a last query tile of 1-2 rows are
// answered by the exact kernel itself. This mirrors the exact kernel's tiling (cpu_retrieval::kBlockCols,
// cpu_retrieval::topk_tile_rows in topk.h). Where the process's GEMM is MKL/BLAS
// (measured faster, or SDML_CPU_GEMM=blas), it rounds by position: there an id can differ, but only between items whose float32
// scores lie within the GEMM's rounding (<= d 2^-24) of each other at the k-th place, where the
// exact mode's own order is an artifact of its tiling.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "topk.h"

#include "sdml/cpu_blas.h"
#include "sdml/cpu_gemm.h"
#include "sdml/macros.h"
#include "sdml/retrieval.h"
#include "sdml/topk_precision.h"

namespace sdml {
namespace {

// Query rows per tile: many, so that oneDNN's reorder of each gallery block is paid for by a large
// product; fewer when that would leave a thread without kTilesPerThread tiles.
constexpr int64_t kMinTileRows = 16, kMaxTileRows = 512, kTilesPerThread = 2;
// Gallery rows per bf16 GEMM block: its scores (rows x cols bf16) stay within a few MiB.
constexpr int64_t kBlockCols = 4096;
// Queries whose candidates are re-scored by one float32 GEMM (>= 3 rows: see the header).
constexpr int64_t kGroupRows = 4;
// Least columns of a re-score GEMM (>= 5: see the header); fewer candidates are padded.
constexpr int64_t kMinGroupCols = 8;
// Items per scan chunk: a chunk whose best score is below the threshold is skipped whole.
constexpr int64_t kChunk = 32;

// The exact kernel's GEMM calls round differently in calls of fewer than 3 rows or 5 columns, so
// the re-score must know where it made such calls: its tiling is read from topk.h
// (cpu_retrieval::kBlockCols, cpu_retrieval::topk_tile_rows).
constexpr int64_t kSmallCallRows = 3, kSmallCallCols = 5;

int64_t tile_rows(int64_t nq) {
  const int64_t share = kTilesPerThread * at::get_num_threads();
  return std::clamp<int64_t>((nq + share - 1) / share, kMinTileRows, kMaxTileRows);
}

// The exact mode's block GEMM: the library the exact kernel's top-k blocks run on (the process's
// measured choice, sdml/cpu_gemm.h), so that the re-score rounds each product as it did.
class Fp32Gemm {
 public:
  Fp32Gemm() : gemm_(cpu_gemm_choice().gemm) {}  // constructed outside the parallel region
  // a [m, d] times b [n, d] transposed: [m, n].
  at::Tensor scores(const at::Tensor& a, const at::Tensor& b) const {
    at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
    return cpu_gemm_nt(gemm_, a, b, out);
  }

 private:
  CpuGemm gemm_;
};

// The re-score reads each candidate's gallery row on its own (a gather), which costs about as
// much as scoring kDenseCandidates items by the exact kernel's GEMM: where a query has more
// candidates than Ng / kDenseCandidates (a large k in a crowded score range), the exact kernel is
// faster and runs instead. Measured on a sample (kProbeQueries x kProbeItems) before the search;
// galleries of at most kProbeItems are always searched in bf16 (small: either way is cheap).
constexpr int64_t kDenseCandidates = 64;
constexpr int64_t kProbeQueries = 32, kProbeItems = 16384;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The items of one query whose bf16 score is >= (running k-th best) - margin.
class MarginCandidates {
 public:
  MarginCandidates(int64_t k, float margin) : k_(k), margin_(margin) {}

  void reset() {
    items_.clear();
    kth_ = -std::numeric_limits<float>::infinity();
    cap_ = std::max<int64_t>(4 * k_, 256);
  }
  float threshold() const { return kth_ - margin_; }

  // Offers bf16 scores s[0, n) of gallery items base, base + 1, ...; `self` is never a candidate.
  SDML_CPU_CLONES void offer_block(const uint16_t* s, int64_t n, int64_t base, int64_t self) {
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t len = std::min(kChunk, n - t0);
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < len; ++j) m = std::max(m, bf16_to_float(s[t0 + j]));
      const float thr = threshold();
      if (m < thr) continue;
      for (int64_t j = 0; j < len; ++j) {
        const float v = bf16_to_float(s[t0 + j]);
        if (v >= thr && base + t0 + j != self) items_.push_back({v, base + t0 + j});
      }
      if (int64_t(items_.size()) >= cap_) prune();
    }
  }

  // Drops the items below (k-th best) - margin; the list then holds every candidate.
  void prune() {
    if (int64_t(items_.size()) >= k_) {
      std::nth_element(items_.begin(), items_.begin() + (k_ - 1), items_.end(),
                       [](const Item& a, const Item& b) { return a.score > b.score; });
      kth_ = std::max(kth_, items_[k_ - 1].score);
      const float thr = threshold();
      items_.erase(std::remove_if(items_.begin(), items_.end(), [thr](const Item& it) { return it.score < thr; }),
                   items_.end());
    }
    cap_ = std::max<int64_t>(cap_, 2 * int64_t(items_.size()));
  }

  // The candidates' gallery indices, ascending.
  void indices(std::vector<int64_t>& out) {
    prune();
    out.clear();
    for (const Item& it : items_) out.push_back(it.index);
    std::sort(out.begin(), out.end());
  }

 private:
  struct Item {
    float score;
    int64_t index;
  };
  int64_t k_;
  float margin_;
  float kth_ = -std::numeric_limits<float>::infinity();
  int64_t cap_ = 0;
  std::vector<Item> items_;
};

struct Scored {
  float score;
  int64_t index;
  bool operator<(const Scored& o) const { return score > o.score || (score == o.score && index < o.index); }
};

// Whether the candidates of this search would be dense (see kDenseCandidates): the bf16 scores
// of the first kProbeQueries queries against the first kProbeItems items, and the share of those
// items within `margin` of the k-th best, k scaled to the sample.
bool dense_candidates(const at::Tensor& query_bf16, const at::Tensor& gallery_bf16, int64_t k, float margin) {
  const int64_t ng = gallery_bf16.size(0);
  if (ng <= kProbeItems) return false;
  const at::Tensor s = at::mm(query_bf16.narrow(0, 0, std::min(kProbeQueries, query_bf16.size(0))),
                              gallery_bf16.narrow(0, 0, kProbeItems).t()).to(at::kFloat).contiguous();
  const int64_t kk = std::max<int64_t>(1, k * kProbeItems / ng);
  const float* p = s.const_data_ptr<float>();
  std::vector<float> row(kProbeItems);
  int64_t candidates = 0;
  for (int64_t i = 0; i < s.size(0); ++i) {
    std::copy(p + i * kProbeItems, p + (i + 1) * kProbeItems, row.begin());
    std::nth_element(row.begin(), row.begin() + (kk - 1), row.end(), std::greater<float>());
    const float thr = row[kk - 1] - margin;
    candidates += std::count_if(row.begin(), row.end(), [thr](float v) { return v >= thr; });
  }
  return candidates * kDenseCandidates > s.size(0) * kProbeItems;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cosine_topk_bf16_cpu(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                        int64_t k, bool exclude_self) {
  constexpr const char* op = "cosine_topk";
  // The exact mode's normalized rows (bit for bit), and their bf16 copies.
  const auto [query, raw_gallery, gallery_norms] = embeddings_with_gallery_norms(op, query_in, gallery_in, exclude_self);
  const at::Tensor gallery = at::div(raw_gallery, gallery_norms);
  const int64_t nq = query.size(0), ng = gallery.size(0), d = query.size(1);
  check_topk_k(op, k, ranked_items(ng, exclude_self), exclude_self);
  TORCH_CHECK(query.scalar_type() == at::kFloat && nq >= kGroupRows - 1, op, ": the bf16 kernel needs float32 and >= 3 queries");
  const at::Tensor query_bf16 = query.to(at::kBFloat16), gallery_bf16 = gallery.to(at::kBFloat16);
  const float margin = static_cast<float>(2 * bf16_score_bound(d));
  if (dense_candidates(query_bf16, gallery_bf16, k, margin)) {
    static const auto exact_op = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("sdml::cosine_topk", "")
                                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                               int64_t, bool, c10::string_view)>();
    return exact_op.call(query_in, gallery_in, k, exclude_self, "exact");
  }
  const Fp32Gemm fp32;
  const int64_t rows = tile_rows(nq), tiles = (nq + rows - 1) / rows;
  at::Tensor scores = at::empty({nq, k}, query.options());
  at::Tensor indices = at::empty({nq, k}, query.options().dtype(at::kLong));
  float* out_scores = scores.mutable_data_ptr<float>();
  int64_t* out_indices = indices.mutable_data_ptr<int64_t>();
  const float* g = gallery.const_data_ptr<float>();
  const int64_t tail_width = ng % cpu_retrieval::kBlockCols;
  const int64_t tail0 = (tail_width > 0 && tail_width < kSmallCallCols) ? ng - tail_width : ng;

  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tiles, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // not inherited by OpenMP threads
    const SingleThreadedBlas one_thread;
    at::Tensor block_scores = at::empty({rows, kBlockCols}, query_bf16.options());
    std::vector<MarginCandidates> cands(rows, MarginCandidates(k, margin));
    std::vector<std::vector<int64_t>> cand_idx(kGroupRows);
    std::vector<int64_t> group_union;
    std::vector<Scored> ranked;
    at::Tensor gathered = at::empty({0, d}, query.options());
    at::Tensor q_pad = at::empty({kGroupRows, d}, query.options());
    for (int64_t tile = next++; tile < tiles; tile = next++) {
      const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
      const at::Tensor q_tile = query_bf16.narrow(0, q0, nrows);
      for (int64_t i = 0; i < nrows; ++i) cands[i].reset();
      for (int64_t g0 = 0; g0 < ng; g0 += kBlockCols) {
        const int64_t ncols = std::min(kBlockCols, ng - g0);
        at::Tensor block = block_scores.narrow(0, 0, nrows).narrow(1, 0, ncols);
        at::mm_out(block, q_tile, gallery_bf16.narrow(0, g0, ncols).t());
        const auto* s = reinterpret_cast<const uint16_t*>(block.const_data_ptr<at::BFloat16>());
        const int64_t stride = block.stride(0);
        for (int64_t i = 0; i < nrows; ++i)
          cands[i].offer_block(s + i * stride, ncols, g0, exclude_self ? q0 + i : -1);
      }
      // Re-score kGroupRows queries at a time: their candidates' union, one float32 GEMM.
      for (int64_t r0 = 0; r0 < nrows; r0 += kGroupRows) {
        const int64_t m = std::min(kGroupRows, nrows - r0);
        group_union.clear();
        for (int64_t i = 0; i < m; ++i) {
          cands[r0 + i].indices(cand_idx[i]);
          group_union.insert(group_union.end(), cand_idx[i].begin(), cand_idx[i].end());
        }
        std::sort(group_union.begin(), group_union.end());
        group_union.erase(std::unique(group_union.begin(), group_union.end()), group_union.end());
        const int64_t u = int64_t(group_union.size()), cols = std::max(u, kMinGroupCols);
        if (gathered.size(0) < cols) gathered = at::empty({std::max(cols, 2 * gathered.size(0)), d}, query.options());
        float* gp = gathered.mutable_data_ptr<float>();
        for (int64_t c = 0; c < cols; ++c) std::memcpy(gp + c * d, g + group_union[std::min(c, u - 1)] * d, d * sizeof(float));
        // Rows: the group's queries, the last repeated up to kGroupRows (padding only).
        at::Tensor q_group = query.narrow(0, q0 + r0, m);
        if (m < kGroupRows) {
          float* qp = q_pad.mutable_data_ptr<float>();
          for (int64_t i = 0; i < kGroupRows; ++i)
            std::memcpy(qp + i * d, query.const_data_ptr<float>() + (q0 + r0 + std::min(i, m - 1)) * d, d * sizeof(float));
          q_group = q_pad;
        }
        const at::Tensor exact = fp32.scores(q_group, gathered.narrow(0, 0, cols)).contiguous();
        const float* e = exact.const_data_ptr<float>();
        // The exact kernel scored a last gallery block of < kSmallCallCols items in a call that
        // narrow: those items are scored so too (the whole block, in one call).
        at::Tensor tail_scores;
        const float* te = nullptr;
        if (tail0 < ng) {
          tail_scores = fp32.scores(q_group, gallery.narrow(0, tail0, ng - tail0)).contiguous();
          te = tail_scores.const_data_ptr<float>();
        }
        for (int64_t i = 0; i < m; ++i) {
          ranked.clear();
          for (const int64_t idx : cand_idx[i]) {
            if (idx >= tail0) {
              ranked.push_back({te[i * (ng - tail0) + (idx - tail0)], idx});
              continue;
            }
            const int64_t c = std::lower_bound(group_union.begin(), group_union.end(), idx) - group_union.begin();
            ranked.push_back({e[i * cols + c], idx});
          }
          // at least k candidates (the k best bf16 scores are among them)
          std::nth_element(ranked.begin(), ranked.begin() + (k - 1), ranked.end());
          std::sort(ranked.begin(), ranked.begin() + k);
          const int64_t qi = q0 + r0 + i;
          for (int64_t j = 0; j < k; ++j) {
            out_scores[qi * k + j] = ranked[j].score;
            out_indices[qi * k + j] = ranked[j].index;
          }
        }
      }
    }
  });
  // The exact kernel's last query tile, when it has fewer than kSmallCallRows rows, ran in calls
  // that narrow: those queries are answered by the exact kernel itself, on the same rows.
  const int64_t exact_rows = cpu_retrieval::topk_tile_rows(nq, k, sizeof(float));
  const int64_t last_rows = nq - (nq - 1) / exact_rows * exact_rows;
  if (last_rows < kSmallCallRows) {
    static const auto exact_op = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("sdml::cosine_topk", "")
                                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                               int64_t, bool, c10::string_view)>();
    const int64_t first = nq - last_rows;
    if (!exclude_self) {
      const auto [s, i] = exact_op.call(query_in.narrow(0, first, last_rows), gallery_in, k, false, "exact");
      scores.narrow(0, first, last_rows).copy_(s);
      indices.narrow(0, first, last_rows).copy_(i);
    } else {
      // exclude_self needs Nq == Ng: these rows' results come from the same call as the exact
      // mode's, on a query set whose last tile is the same rows (the full call would be the whole
      // exact search); so rank them with self masked, as the exact kernel does, through the same
      // narrow call shape: the exact kernel's scores of those rows (k + 1 best, self removed).
      const int64_t kk = std::min(k + 1, ng);
      const auto [s, i] = exact_op.call(query_in.narrow(0, first, last_rows), gallery_in, kk, false, "exact");
      for (int64_t r = 0; r < last_rows; ++r) {
        const int64_t self = first + r;
        int64_t out = 0;
        for (int64_t j = 0; j < kk && out < k; ++j) {
          if (i[r][j].item<int64_t>() == self) continue;
          scores[self][out] = s[r][j];
          indices[self][out] = i[r][j];
          ++out;
        }
      }
    }
  }
  return {scores, indices};
}

}  // namespace sdml
