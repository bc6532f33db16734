// cosine_topk, precision="bf16", on the CPU: the exact mode's answer from a bf16 first pass.
//
// 1. Scores in bf16: each thread takes a tile of query rows and runs at::mm on bf16 copies of the
//    normalized query tile and gallery blocks (oneDNN: AMX / AVX512-BF16 units), single-threaded
//    inside the parallel region like the exact kernel's tiles. The copies (bf16_rows.h) also give
//    each row's rounding terms.
// 2. Candidates (margin_candidates.h): per query, every ranked item whose bf16 score S reaches
//    bf16_candidate_threshold(kappa, D), kappa the k-th best bf16 score and D the query's bound
//    over the gallery (sdml/topk_precision.h, derived in topk_precision.cpp): |S - s| <= rho |S| +
//    D for every item, so every item of the exact mode's top k is among them.
// 3. Re-scoring, per tile, once its candidates are known: each candidate's exact float32 score.
//    Where the exact kernel's GEMM follows the model of exact_dots.h (a probe compares it, bit
//    for bit, at every call shape of this search), the score is computed pair by pair from the
//    gallery row in place: 16 candidates of a query per vector (their rows loaded 16 coordinates
//    at a time and transposed), the tile's groups in gallery order so that neighbouring groups
//    share rows while they are in cache. Elsewhere (a
//    GEMM the model does not reproduce, e.g. MKL's) the candidates of kGroupRows queries are
//    gathered and scored by the same GEMM as the exact mode (oneDNN rounds a product the same
//    wherever it sits in a call of >= 3 rows and >= 5 columns, our AVX2 kernel in any call
//    (sdml/panel_gemm.h); MKL/BLAS by position, where an id
//    can then differ between items whose float32 scores lie within the GEMM's rounding of each
//    other at the k-th place, the exact mode's own order there being an artifact of its tiling).
//    Then each query's candidates are ranked like the exact mode (higher score, lower index).
//
// The exact kernel's narrow calls (fewer than 3 rows or 5 columns) may take other code paths in
// oneDNN (a matrix-vector product rounds differently), so they are mirrored either way: a last gallery block of 1-4 items (Ng mod 1024) is re-scored in one call of that width,
// and the queries of a last query tile of 1-2 rows are answered by the exact kernel itself (its
// tiling: cpu_retrieval::kBlockCols, cpu_retrieval::topk_tile_rows in topk.h).
//
// Where the candidates would be many (a large k in a crowded score range), the exact kernel is
// faster and runs instead: decided from the candidates of a sample of the search and, for the
// pairwise re-score, the measured times of the three parts at the exact kernel's call shape.
// SDML_CPU_BF16_RESCORE=auto|dots|gemm|exact forces a path (tests; the answer is the same).
//
// The exact mode calls this kernel as its filter (as_filter; cosine_topk_cpu in retrieval.cpp) on
// CPUs with bf16 units: there only the pairwise re-score, proven bit for bit the exact kernel's,
// may answer, so the exact mode's ids and scores are its float32 kernel's whichever runs.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string_view>
#include <vector>

#include "bf16_rows.h"
#include "exact_dots.h"
#include "margin_candidates.h"
#include "rank_keys.h"
#include "topk.h"

#include "sdml/checks.h"
#include "sdml/cpu_blas.h"
#include "sdml/cpu_gemm.h"
#include "sdml/host_buffers.h"
#include "sdml/retrieval.h"
#include "sdml/topk_precision.h"

namespace sdml {
namespace {

using cpu_retrieval::Bf16Rows;
using cpu_retrieval::DotGroup;
using cpu_retrieval::MarginCandidates;

// Query rows per tile: many, so that oneDNN's reorder of each gallery block is paid for by a large
// product; fewer when that would leave a thread without kTilesPerThread tiles.
constexpr int64_t kMinTileRows = 16, kMaxTileRows = 512, kTilesPerThread = 2;
// Gallery rows per bf16 GEMM block: its scores (rows x cols bf16) stay within a few MiB. (The
// exact kernel's blocks, whose calls the re-score mirrors, are cpu_retrieval::kBlockCols.)
constexpr int64_t kBf16BlockCols = 4096;
// GEMM re-score: queries per float32 GEMM (>= 3 rows: see the header), least columns (>= 5).
constexpr int64_t kGroupRows = 4, kMinGroupCols = 8;
// The exact kernel's GEMM calls round differently in calls of fewer than 3 rows or 5 columns.
constexpr int64_t kSmallCallRows = 3, kSmallCallCols = 5;
// The choice of the exact kernel: on a sample of kProbeQueries x kProbeItems (galleries of at
// most kProbeItems always run in bf16: small, either way is cheap). The GEMM re-score reads each
// candidate's row on its own, about the cost of scoring kDenseCandidates items by the exact
// kernel's GEMM; the pairwise re-score is timed. kScanFactor: the bf16 pass costs its GEMM and
// a scan of its scores, taken as this many times the GEMM; kRescoreFactor: the timed pairs read
// rows from the L2 cache, a search's mostly from further out (up to twice as slow, measured).
constexpr int64_t kProbeQueries = 32, kProbeItems = 16384, kDenseCandidates = 64;
constexpr double kScanFactor = 1.5, kRescoreFactor = 2;
// The sample behind the guesses of kappa (GallerySample): every kSampleStride-th gallery row (or
// sparser: at most kSampleMaxRows rows), for galleries of at least kSampleMinGallery rows.
constexpr int64_t kSampleStride = 16, kSampleMaxRows = 16384, kSampleMinGallery = 4 * kBf16BlockCols;

// Bytes of a tile's candidate lists that set fewer rows for a very large k (a list holds up to
// about four times k items of 8 bytes; MarginCandidates).
constexpr int64_t kCandidateBytes = 64 << 20;

int64_t tile_rows(int64_t nq, int64_t k) {
  const int64_t share = kTilesPerThread * at::get_num_threads();
  const int64_t rows = std::clamp<int64_t>((nq + share - 1) / share, kMinTileRows, kMaxTileRows);
  return std::min(rows, std::max<int64_t>(kMinTileRows, kCandidateBytes / (32 * k)));
}

enum class Path { Auto, Dots, Gemm, Exact };

Path forced_path() {
  const char* v = std::getenv("SDML_CPU_BF16_RESCORE");
  const std::string_view s = v ? v : "auto";
  if (s == "auto" || s.empty()) return Path::Auto;
  if (s == "dots") return Path::Dots;
  if (s == "gemm") return Path::Gemm;
  if (s == "exact") return Path::Exact;
  SDML_CHECK_VALUE(false, "SDML_CPU_BF16_RESCORE must be auto, dots, gemm or exact, got \"", s, "\"");
  return Path::Auto;
}

using ExactFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, bool,
                                                   c10::string_view);
// The exact mode through the dispatcher, as the float32 kernel alone (not its bf16 filter, which
// is this kernel).
std::tuple<at::Tensor, at::Tensor> exact_kernel(const at::Tensor& query, const at::Tensor& gallery, int64_t k,
                                                bool exclude_self) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sdml::cosine_topk", "").typed<ExactFn>();
  const ExactKernelOnly float32_kernel;
  return op.call(query, gallery, k, exclude_self, "exact");
}

// The exact mode's block GEMM: the library the exact kernel's top-k blocks run on (the process's
// measured choice, sdml/cpu_gemm.h), so that the re-score rounds each product as it did.
class Fp32Gemm {
 public:
  Fp32Gemm() : gemm_(cpu_gemm_choice().gemm) {}  // constructed outside the parallel region
  CpuGemm library() const { return gemm_; }
  // a [m, d] times b [n, d] transposed: [m, n], contiguous.
  at::Tensor scores(const at::Tensor& a, const at::Tensor& b) const {
    at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
    return cpu_gemm_nt(gemm_, a, b, out).contiguous();
  }

 private:
  CpuGemm gemm_;
};

// How the exact kernel (topk.h) calls its GEMM for this search: its tile rows and last tile's,
// the start of a last gallery block too narrow to mirror pairwise, and whether its GEMMs run
// inside an active parallel region.
struct ExactCalls {
  int64_t rows, last_rows, tail0;
  std::vector<int64_t> probe_rows, probe_cols;  // the call shapes re-scored pairwise
  bool parallel_region;
};

ExactCalls exact_calls(int64_t nq, int64_t ng, int64_t k) {
  constexpr int64_t cols = cpu_retrieval::kBlockCols;  // the exact kernel's blocks, not this kernel's
  ExactCalls c;
  c.rows = cpu_retrieval::topk_tile_rows(nq, k, sizeof(float));
  const int64_t tiles = (nq + c.rows - 1) / c.rows, blocks = (ng + cols - 1) / cols;
  c.last_rows = nq - (tiles - 1) * c.rows;
  const int64_t tail_width = ng % cols;
  c.tail0 = (tail_width > 0 && tail_width < kSmallCallCols) ? ng - tail_width : ng;
  c.parallel_region = std::min<int64_t>(tiles * cpu_retrieval::gallery_ranges(tiles, blocks), at::get_num_threads()) > 1;
  c.probe_rows.push_back(std::min(c.rows, nq));
  if (c.last_rows != c.probe_rows[0] && c.last_rows >= kSmallCallRows) c.probe_rows.push_back(c.last_rows);
  if (ng >= cols) c.probe_cols.push_back(cols);
  if (tail_width >= kSmallCallCols) c.probe_cols.push_back(tail_width);
  return c;
}

// The chunk of the model (exact_dots.h) that reproduces every call shape of the exact kernel for
// this search, or 0.
int64_t model_chunk(const Fp32Gemm& fp32, const ExactCalls& calls, int64_t d) {
  int64_t chunk = -1;
  for (const int64_t r : calls.probe_rows)
    for (const int64_t c : calls.probe_cols) {
      const int64_t found = cpu_retrieval::probe_exact_dots(fp32.library(), r, c, d, calls.parallel_region, false).chunk;
      if (found == 0 || (chunk > 0 && found != chunk)) return 0;
      chunk = found;
    }
  return std::max<int64_t>(chunk, 0);
}

// The share of (query, item) pairs that would be candidates, on the first kProbeQueries queries
// and kProbeItems items, k scaled to the sample.
double candidate_share(const at::Tensor& query_bf16, const at::Tensor& gallery_bf16, int64_t k,
                       const std::vector<double>& D) {
  const int64_t ng = gallery_bf16.size(0);
  const at::Tensor s = at::mm(query_bf16.narrow(0, 0, std::min(kProbeQueries, query_bf16.size(0))),
                              gallery_bf16.narrow(0, 0, kProbeItems).t()).to(at::kFloat).contiguous();
  const int64_t kk = std::max<int64_t>(1, k * kProbeItems / ng);
  const float* p = s.const_data_ptr<float>();
  std::vector<float> row(kProbeItems);
  int64_t candidates = 0;
  for (int64_t i = 0; i < s.size(0); ++i) {
    std::copy(p + i * kProbeItems, p + (i + 1) * kProbeItems, row.begin());
    std::nth_element(row.begin(), row.begin() + (kk - 1), row.end(), std::greater<float>());
    const float thr = bf16_candidate_threshold(row[kk - 1], D[i]);
    candidates += std::count_if(row.begin(), row.end(), [thr](float v) { return v >= thr; });
  }
  return double(candidates) / double(s.size(0) * kProbeItems);
}

// The last query tile of the exact kernel, when it has fewer than kSmallCallRows rows, ran in
// calls that narrow: those queries are answered by the exact kernel itself, on the same rows.
void answer_last_rows_exactly(const at::Tensor& query_in, const at::Tensor& gallery_in, int64_t k, bool exclude_self,
                              int64_t last_rows, at::Tensor& scores, at::Tensor& indices) {
  const int64_t nq = query_in.size(0), ng = gallery_in.size(0), first = nq - last_rows;
  if (!exclude_self) {
    const auto [s, i] = exact_kernel(query_in.narrow(0, first, last_rows), gallery_in, k, false);
    scores.narrow(0, first, last_rows).copy_(s);
    indices.narrow(0, first, last_rows).copy_(i);
    return;
  }
  // exclude_self needs Nq == Ng: these rows' results come from the same call as the exact mode's,
  // on a query set whose last tile is the same rows (the full call would be the whole exact
  // search); so rank them with self masked, as the exact kernel does, through the same narrow
  // call shape: the exact kernel's scores of those rows (k + 1 best, self removed).
  const int64_t kk = std::min(k + 1, ng);
  const auto [s, i] = exact_kernel(query_in.narrow(0, first, last_rows), gallery_in, kk, false);
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

// A guess of each query's final kappa (the k-th best bf16 score) starts its threshold high: the
// kth-best of its bf16 scores against every kSampleStride-th gallery row (fewer in a very large
// gallery), with kth above the share of k that the sample holds on average (1.25 times it, plus
// four standard deviations of a count), so that the guess is rarely above the final kappa;
// MarginCandidates checks it, and a query whose guess was too high is searched again. Without it
// the threshold rises from nothing as the blocks come, and a large k appends k ln(Ng / k) items on
// the way.
struct GallerySample {
  at::Tensor rows;  // [n, d] bf16 (n = 0: no guesses)
  int64_t kth = 0;
};

GallerySample gallery_sample(const at::Tensor& gallery_bf16, int64_t k) {
  const int64_t ng = gallery_bf16.size(0);
  if (ng < kSampleMinGallery) return {gallery_bf16.narrow(0, 0, 0), 0};
  const int64_t stride = std::max(kSampleStride, (ng + kSampleMaxRows - 1) / kSampleMaxRows);
  const int64_t n = (ng + stride - 1) / stride;
  const double expected = double(k) * double(n) / double(ng);
  const int64_t kth = static_cast<int64_t>(std::ceil(1.25 * expected + 4 * std::sqrt(expected) + 2));
  if (kth > n / 4) return {gallery_bf16.narrow(0, 0, 0), 0};  // a large share: the guess would save little
  return {gallery_bf16.slice(0, 0, ng, stride).contiguous(), kth};
}

// One thread's working memory for its tiles.
struct TileScratch {
  TileScratch(int64_t rows, int64_t k, const at::Tensor& query_bf16, const at::Tensor& query, int64_t sample_rows)
      : block_scores(at::empty({rows, kBf16BlockCols}, query_bf16.options())),
        sample_scores(at::empty({rows, sample_rows}, query_bf16.options())),
        cands(rows, MarginCandidates(k)),
        idx(rows),
        exact(rows),
        gathered(at::empty({0, query.size(1)}, query.options())),
        q_pad(at::empty({kGroupRows, query.size(1)}, query.options())) {}
  at::Tensor block_scores, sample_scores;
  std::vector<MarginCandidates> cands;
  std::vector<int64_t> search;            // the tile rows being searched
  std::vector<std::vector<int64_t>> idx;  // per tile row: its candidates, ascending
  std::vector<std::vector<float>> exact;  // their exact scores
  std::vector<DotGroup> groups;
  std::vector<int64_t> group_union;
  std::vector<uint64_t> ranked, sort_scratch;
  at::Tensor gathered, q_pad;
};

// Rows r0 .. r0 + m - 1 of the tile (m <= kGroupRows), as a GEMM operand of kGroupRows rows:
// the last row repeated (padding only; its scores are not read).
at::Tensor group_rows(const at::Tensor& query, int64_t q0, int64_t m, at::Tensor& q_pad) {
  if (m == kGroupRows) return query.narrow(0, q0, m);
  const int64_t d = query.size(1);
  float* qp = q_pad.mutable_data_ptr<float>();
  for (int64_t i = 0; i < kGroupRows; ++i)
    std::memcpy(qp + i * d, query.const_data_ptr<float>() + (q0 + std::min(i, m - 1)) * d, d * sizeof(float));
  return q_pad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cosine_topk_bf16_cpu(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                        int64_t k, bool exclude_self, bool as_filter) {
  constexpr const char* op = "cosine_topk";
  const Path forced = forced_path();
  // The exact mode's normalized query rows (bit for bit), and the gallery and its norms.
  const auto [query, raw_gallery, gallery_norms] = embeddings_with_gallery_norms(op, query_in, gallery_in, exclude_self);
  const int64_t nq = query.size(0), ng = raw_gallery.size(0), d = query.size(1);
  check_topk_k(op, k, ranked_items(ng, exclude_self), exclude_self);
  TORCH_CHECK(query.scalar_type() == at::kFloat && nq >= kSmallCallRows, op, ": the bf16 kernel needs float32 and >= 3 queries");
  // Candidate lists hold int32 gallery indices and positions.
  if (forced == Path::Exact || ng > std::numeric_limits<int32_t>::max())
    return exact_kernel(query_in, gallery_in, k, exclude_self);
  // The gallery normalized as the exact kernel normalizes it (its at::div, element for element),
  // its bf16 copy and terms in one pass, into blocks reused across calls (no page faults).
  const Bf16Rows query_bf16 = cpu_retrieval::bf16_rows(query);
  const Bf16Rows gallery_bf16 = cpu_retrieval::bf16_rows(raw_gallery, gallery_norms);
  const at::Tensor& gallery = gallery_bf16.normalized;
  std::vector<double> D(nq);
  bool finite = true;
  for (int64_t i = 0; i < nq; ++i) {
    D[i] = bf16_pair_bound(query_bf16.terms[i], gallery_bf16.max, d);
    finite = finite && std::isfinite(D[i]);
  }
  if (!finite) return exact_kernel(query_in, gallery_in, k, exclude_self);

  const Fp32Gemm fp32;
  const ExactCalls calls = exact_calls(nq, ng, k);
  const int64_t chunk = forced == Path::Gemm ? 0 : model_chunk(fp32, calls, d);
  const bool dots = chunk > 0;
  // As the exact mode's filter, only where the re-score is proven to be the exact kernel's own
  // arithmetic: the gathered GEMM re-score can differ at near-ties where the GEMM is MKL's.
  if (as_filter && !dots) return exact_kernel(query_in, gallery_in, k, exclude_self);
  if (forced == Path::Auto && ng > kProbeItems) {
    const double share = candidate_share(query_bf16.values, gallery_bf16.values, k, D);
    bool dense = share * kDenseCandidates > 1;
    if (dots) {
      // The three parts per (query, item) pair at the exact kernel's main call shape, timed.
      const auto t = cpu_retrieval::probe_exact_dots(fp32.library(), calls.probe_rows[0], calls.probe_cols[0], d,
                                                     calls.parallel_region, true);
      dense = kScanFactor * t.bf16_s + kRescoreFactor * share * t.dots_s >= t.gemm_s;
    }
    if (dense) return exact_kernel(query_in, gallery_in, k, exclude_self);
  }

  const int64_t rows = tile_rows(nq, k), tiles = (nq + rows - 1) / rows;
  at::Tensor scores = at::empty({nq, k}, query.options());
  at::Tensor indices = at::empty({nq, k}, query.options().dtype(at::kLong));
  float* out_scores = scores.mutable_data_ptr<float>();
  int64_t* out_indices = indices.mutable_data_ptr<int64_t>();
  const float* g = gallery.const_data_ptr<float>();
  const float* qf = query.const_data_ptr<float>();
  const int64_t tail0 = calls.tail0;
  const at::Tensor& qb = query_bf16.values;
  const at::Tensor& gb = gallery_bf16.values;

  const GallerySample sample = gallery_sample(gb, k);
  // The bf16 scores of the queries q_rows (rows w.search[j] of the tile at q0), block by block,
  // offered to their candidate lists.
  const auto scan = [&](const at::Tensor& q_rows, int64_t q0, TileScratch& w) {
    const int64_t m = q_rows.size(0);
    for (int64_t g0 = 0; g0 < ng; g0 += kBf16BlockCols) {
      const int64_t ncols = std::min(kBf16BlockCols, ng - g0);
      at::Tensor block = w.block_scores.narrow(0, 0, m).narrow(1, 0, ncols);
      at::mm_out(block, q_rows, gb.narrow(0, g0, ncols).t());
      const auto* s = reinterpret_cast<const uint16_t*>(block.const_data_ptr<at::BFloat16>());
      const int64_t stride = block.stride(0);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = w.search[j];
        w.cands[i].offer_block(s + j * stride, ncols, g0, exclude_self ? q0 + i : -1);
      }
    }
  };

  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tiles, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // not inherited by OpenMP threads
    const SingleThreadedBlas one_thread;
    TileScratch w(rows, k, qb, query, sample.rows.size(0));
    for (int64_t tile = next++; tile < tiles; tile = next++) {
      const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
      // 1-2. Each query's guess of kappa from the sample, then the bf16 scores of the tile, block by
      // block, and the candidates; queries whose guess proved too high again, without one.
      const at::Tensor q_tile = qb.narrow(0, q0, nrows);
      if (sample.kth > 0) {
        at::Tensor ss = w.sample_scores.narrow(0, 0, nrows);
        at::mm_out(ss, q_tile, sample.rows.t());
        const auto* p = reinterpret_cast<const uint16_t*>(ss.const_data_ptr<at::BFloat16>());
        for (int64_t i = 0; i < nrows; ++i)
          w.cands[i].reset(D[q0 + i], cpu_retrieval::kth_largest_bf16(p + i * ss.stride(0), ss.size(1), sample.kth));
      } else {
        for (int64_t i = 0; i < nrows; ++i) w.cands[i].reset(D[q0 + i]);
      }
      w.search.resize(nrows);
      for (int64_t i = 0; i < nrows; ++i) w.search[i] = i;
      scan(q_tile, q0, w);
      w.search.clear();
      for (int64_t i = 0; i < nrows; ++i)
        if (!w.cands[i].finish(w.idx[i])) w.search.push_back(i);
      if (!w.search.empty()) {
        at::Tensor again = at::empty({int64_t(w.search.size())}, at::TensorOptions().dtype(at::kLong));
        for (size_t j = 0; j < w.search.size(); ++j) {
          again.mutable_data_ptr<int64_t>()[j] = q0 + w.search[j];
          w.cands[w.search[j]].reset(D[q0 + w.search[j]]);
        }
        scan(qb.index_select(0, again), q0, w);
        for (const int64_t i : w.search) w.cands[i].finish(w.idx[i]);  // no guess: always the candidates
      }
      for (int64_t i = 0; i < nrows; ++i) {
        w.exact[i].resize(w.idx[i].size());
      }
      // 3. Their exact scores: items before tail0 pairwise or by gathered GEMMs, the rest by one
      // GEMM of the exact kernel's narrow last block per kGroupRows queries.
      if (dots) {
        w.groups.clear();
        for (int64_t i = 0; i < nrows; ++i) {
          const auto& idx = w.idx[i];
          const int64_t n = std::lower_bound(idx.begin(), idx.end(), tail0) - idx.begin();
          cpu_retrieval::append_dot_groups(qf + (q0 + i) * d, idx.data(), n, w.exact[i].data(), w.groups);
        }
        // In gallery order: the rows of neighbouring groups are read while in cache.
        std::sort(w.groups.begin(), w.groups.end(),
                  [](const DotGroup& a, const DotGroup& b) { return a.idx[0] < b.idx[0]; });
        cpu_retrieval::exact_dot_groups(w.groups.data(), int64_t(w.groups.size()), g, d, chunk);
      }
      for (int64_t r0 = 0; r0 < nrows; r0 += kGroupRows) {
        const int64_t m = std::min(kGroupRows, nrows - r0);
        const at::Tensor q_group = group_rows(query, q0 + r0, m, w.q_pad);
        if (!dots) {
          // Their candidates' union, gathered, one float32 GEMM.
          w.group_union.clear();
          for (int64_t i = 0; i < m; ++i) {
            const auto& idx = w.idx[r0 + i];
            w.group_union.insert(w.group_union.end(), idx.begin(), std::lower_bound(idx.begin(), idx.end(), tail0));
          }
          std::sort(w.group_union.begin(), w.group_union.end());
          w.group_union.erase(std::unique(w.group_union.begin(), w.group_union.end()), w.group_union.end());
          const int64_t u = int64_t(w.group_union.size());
          if (u > 0) {
            const int64_t cols = std::max(u, kMinGroupCols);
            if (w.gathered.size(0) < cols) w.gathered = at::empty({std::max(cols, 2 * w.gathered.size(0)), d}, query.options());
            float* gp = w.gathered.mutable_data_ptr<float>();
            for (int64_t c = 0; c < cols; ++c)
              std::memcpy(gp + c * d, g + w.group_union[std::min(c, u - 1)] * d, d * sizeof(float));
            const at::Tensor e = fp32.scores(q_group, w.gathered.narrow(0, 0, cols));
            const float* ep = e.const_data_ptr<float>();
            for (int64_t i = 0; i < m; ++i) {
              const auto& idx = w.idx[r0 + i];
              for (int64_t c = 0; c < int64_t(idx.size()) && idx[c] < tail0; ++c) {
                const int64_t col = std::lower_bound(w.group_union.begin(), w.group_union.end(), idx[c]) - w.group_union.begin();
                w.exact[r0 + i][c] = ep[i * cols + col];
              }
            }
          }
        }
        // The exact kernel scored a last gallery block of < kSmallCallCols items in a call that
        // narrow: those items are scored so too (the whole block, in one call).
        bool any_tail = false;
        for (int64_t i = 0; i < m; ++i) any_tail = any_tail || (!w.idx[r0 + i].empty() && w.idx[r0 + i].back() >= tail0);
        if (any_tail) {
          const int64_t tw = ng - tail0;
          const at::Tensor te = fp32.scores(q_group, gallery.narrow(0, tail0, tw));
          const float* tp = te.const_data_ptr<float>();
          for (int64_t i = 0; i < m; ++i) {
            const auto& idx = w.idx[r0 + i];
            for (int64_t c = std::lower_bound(idx.begin(), idx.end(), tail0) - idx.begin(); c < int64_t(idx.size()); ++c)
              w.exact[r0 + i][c] = tp[i * tw + (idx[c] - tail0)];
          }
        }
      }
      // The k best of each query's candidates (at least k: the k best bf16 scores are among them).
      for (int64_t i = 0; i < nrows; ++i) {
        const auto& idx = w.idx[i];
        w.ranked.resize(idx.size());
        for (size_t c = 0; c < idx.size(); ++c) w.ranked[c] = cpu_retrieval::rank_key(w.exact[i][c], c);
        cpu_retrieval::sort_keys(w.ranked, k, w.sort_scratch);
        const int64_t qi = q0 + i;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t c = int64_t(w.ranked[j] & 0xFFFFFFFFu);
          out_scores[qi * k + j] = w.exact[i][c];
          out_indices[qi * k + j] = idx[c];
        }
      }
    }
  });
  if (calls.last_rows < kSmallCallRows)
    answer_last_rows_exactly(query_in, gallery_in, k, exclude_self, calls.last_rows, scores, indices);
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> cpu_bf16_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "cpu_bf16_rows: x must be float32 [n, d]");
  const Bf16Rows r = cpu_retrieval::bf16_rows(x.contiguous());
  at::Tensor terms = at::empty({x.size(0), 3}, x.options().dtype(at::kDouble));
  double* t = terms.mutable_data_ptr<double>();
  for (int64_t i = 0; i < x.size(0); ++i) t[3 * i] = r.terms[i].norm, t[3 * i + 1] = r.terms[i].err, t[3 * i + 2] = r.terms[i].norm_bf16;
  return {r.values, terms};
}

at::Tensor cpu_exact_dots(const at::Tensor& q, const at::Tensor& g, const at::Tensor& idx, int64_t chunk) {
  TORCH_CHECK(q.dim() == 1 && g.dim() == 2 && q.size(0) == g.size(1) && q.scalar_type() == at::kFloat &&
                  g.scalar_type() == at::kFloat && idx.dim() == 1 && idx.scalar_type() == at::kLong && chunk > 0,
              "cpu_exact_dots: q [d] and g [n, d] float32, idx [m] int64, chunk > 0");
  const at::Tensor qc = q.contiguous(), gc = g.contiguous(), ic = idx.contiguous();
  const int64_t n = g.size(0), m = idx.size(0);
  for (int64_t c = 0; c < m; ++c) TORCH_CHECK(ic.const_data_ptr<int64_t>()[c] >= 0 && ic.const_data_ptr<int64_t>()[c] < n, "cpu_exact_dots: idx out of range");
  at::Tensor out = at::empty({m}, q.options());
  std::vector<DotGroup> groups;
  cpu_retrieval::append_dot_groups(qc.const_data_ptr<float>(), ic.const_data_ptr<int64_t>(), m, out.mutable_data_ptr<float>(), groups);
  cpu_retrieval::exact_dot_groups(groups.data(), int64_t(groups.size()), gc.const_data_ptr<float>(), q.size(0), chunk);
  return out;
}

int64_t cpu_exact_dots_chunk(int64_t rows, int64_t cols, int64_t d) {
  TORCH_CHECK(rows > 0 && cols > 0 && d > 0, "cpu_exact_dots_chunk: sizes must be positive");
  return cpu_retrieval::probe_exact_dots(Fp32Gemm().library(), rows, cols, d, at::get_num_threads() > 1, false).chunk;
}

}  // namespace sdml
