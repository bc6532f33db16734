// CPU kernels of the retrieval ops. Similarities are computed tile by tile with a GEMM
// (block_scores: one [rows, 1024] block at a time, never the full Nq x Ng matrix). The threads
// take query tiles one at a time from a shared counter and run the GEMM of a tile
// single-threaded, so they never wait for each other (which matters on a shared, oversubscribed
// machine: a GEMM or TensorIterator op called outside a parallel region starts its own OpenMP
// team per call, and with one core taken a thread waits at every barrier: a single query against
// 100,000 items took 20x its GEMM time so). cosine_topk with few query tiles splits each tile's
// gallery into ranges of blocks, so that few queries use every thread too (gallery_ranges).
//
// The float32 GEMM goes through oneDNN (torch's mkldnn::_linear_pointwise op) where torch has
// it: oneDNN picks its kernels by CPU feature, while MKL runs its AVX2 code on AMD CPUs, at half
// the rate on AVX-512 machines such as AMD Zen 5 (measured: ~100 vs ~220 GFLOP/s per core at
// these block shapes). float64, or SDML_CPU_GEMM=blas, uses at::mm_out (MKL / OpenBLAS).
//
// cosine_topk keeps a running top-k per query (a candidate buffer pruned with nth_element).
// The ranking metrics need, per query, the exact rank of every relevant item. Instead of a
// full sort, the row's scores are bucketed (a monotone map of [min, max] onto buckets): an
// item in a higher bucket always scores higher, so a histogram gives each relevant item the
// count of items above its bucket, and items sharing a bucket with a relevant item are
// compared exactly (score, then ascending index) through integer rank keys. See
// sdml/retrieval_math.h for the metrics.
//
// A GEMM may round the same dot product differently at different positions of its output (edge
// tiles, another code path), so an exact duplicate of a gallery row is given its first row's
// score (DuplicateScores): identical rows always tie and come in ascending index order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "sdml/checks.h"
#include "sdml/cpu_blas.h"
#include "sdml/host_buffers.h"
#include "sdml/retrieval.h"
#include "sdml/topk_precision.h"

namespace sdml {
namespace {

using namespace retrieval;

// Query rows per tile: enough rows for GEMM efficiency, fewer when that would leave a thread
// without kTilesPerThread tiles to balance (threads take tiles dynamically), and a score buffer
// of at most kTileBytes. Gallery columns per GEMM block: the block's output (rows x
// kBlockCols) fits the L2 cache.
constexpr int64_t kTileBytes = 64 << 20;
constexpr int64_t kMinTileRows = 16, kMaxTileRows = 256;
constexpr int64_t kBlockCols = 1024;
constexpr int64_t kTilesPerThread = 4;
// Bytes of the running top-k candidates of one tile (cosine_topk).
// Fewer tile rows only for a very large k: fewer rows re-read the gallery more often and starve
// the GEMM (k = 1000, 1,000 x 50,000: 0.70 CPU-s at 32 rows, 0.49 at 250), which costs more than running
// the candidate buffers (2k items per row, mostly untouched) outside the L2 cache.
constexpr int64_t kCandidateBytes = 16 << 20;
// Ranking buckets: about two items per bucket, the bucket array within a share of the L2 cache.
constexpr int64_t kItemsPerBucket = 2;
constexpr size_t kBucketBytes = 256 << 10;

int64_t tile_rows(int64_t nq, int64_t cols, size_t elem) {
  const int64_t share = kTilesPerThread * at::get_num_threads();
  const int64_t balanced = std::max<int64_t>((nq + share - 1) / share, kMinTileRows);
  const int64_t by_memory = kTileBytes / std::max<int64_t>(cols * int64_t(elem), 1);
  return std::max<int64_t>(1, std::min({kMaxTileRows, balanced, by_memory}));
}

// Runs on every thread: setup() makes the thread's scratch, then work(scratch, tile) for the
// tiles the thread takes, one at a time from a shared counter. Dynamic, because on a shared
// machine one thread may run slower than another; BLAS stays single-threaded per thread.
template <typename Setup, typename Work>
void for_each_tile(int64_t tiles, const Setup& setup, const Work& work) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tiles, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SingleThreadedBlas one_thread;
    auto scratch = setup();
    for (int64_t tile = next++; tile < tiles; tile = next++) work(scratch, tile);
  });
}

// The GEMM of one block of scores: q_tile [rows, d] times g_block [cols, d] transposed.
class BlockGemm {
  using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              c10::string_view, c10::List<std::optional<at::Scalar>>,
                              std::optional<c10::string_view>);

 public:
  explicit BlockGemm(at::ScalarType dtype) {
    static const std::optional<c10::TypedOperatorHandle<LinearFn>> linear = find_onednn();
    if (dtype == at::kFloat && linear) linear_ = &*linear;
  }

  // The scores, in `out` [rows, cols] (any row stride) or in a fresh contiguous tensor.
  at::Tensor scores(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const {
    if (linear_) return linear_->call(q_tile, g_block, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
    at::mm_out(out, q_tile, g_block.t());
    return out;
  }

  // As scores(), always into `out`.
  void scores_into(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const {
    const at::Tensor s = scores(q_tile, g_block, out);
    if (!s.is_same(out)) out.copy_(s);
  }

 private:
  static std::optional<c10::TypedOperatorHandle<LinearFn>> find_onednn() {
    const char* choice = std::getenv("SDML_CPU_GEMM");
    if (choice && std::string_view(choice) == "blas") return std::nullopt;
    const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return handle->typed<LinearFn>();
  }

  const c10::TypedOperatorHandle<LinearFn>* linear_ = nullptr;
};

void check_cpu_dtype(const char* op, const at::Tensor& query) {
  TORCH_CHECK_TYPE(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble, op,
                   ": on CPU query must be float32 or float64, got ", query.scalar_type());
}

// Gives every duplicate gallery row (see DuplicateRows) its first row's score, one block of
// gallery columns at a time: blocks come in ascending order and a first row precedes its
// duplicates, so its score is saved (per query row, in `saved` [rows, slots()]) before it is
// needed.
class DuplicateScores {
 public:
  explicit DuplicateScores(const DuplicateRows& rows) {
    const int64_t n = rows.size();
    const int64_t* dup = rows.dup.const_data_ptr<int64_t>();
    const int64_t* rep = rows.rep.const_data_ptr<int64_t>();
    firsts_.assign(rep, rep + n);
    std::sort(firsts_.begin(), firsts_.end());
    firsts_.erase(std::unique(firsts_.begin(), firsts_.end()), firsts_.end());
    dups_.resize(n);
    for (int64_t i = 0; i < n; ++i)
      dups_[i] = {dup[i], std::lower_bound(firsts_.begin(), firsts_.end(), rep[i]) - firsts_.begin()};
  }

  int64_t slots() const { return firsts_.size(); }

  // Scores s[i * stride + (t - g0)] of query rows i < rows for gallery items t in [g0, g0 + cols).
  template <typename T>
  void apply(T* s, int64_t rows, int64_t stride, int64_t g0, int64_t cols, T* saved) const {
    visit(s, rows, stride, g0, cols, saved, [](const T* saved_row, int64_t slot) { return saved_row[slot]; });
  }

  // For gallery ranges scored out of order (on different threads): as apply(), but a duplicate
  // scores -inf (it is never kept), and its first row's score is only saved, in `saved`
  // [rows, slots()] shared by all ranges (each first row lies in one range). offer_saved() then
  // offers the duplicates with their first rows' scores.
  template <typename T>
  void save_firsts_mask_dups(T* s, int64_t rows, int64_t stride, int64_t g0, int64_t cols, T* saved) const {
    visit(s, rows, stride, g0, cols, saved, [](const T*, int64_t) { return -std::numeric_limits<T>::infinity(); });
  }

  // Calls offer(score, index) for every duplicate but `self`, its score from row `saved` [slots()].
  template <typename T, typename Offer>
  void offer_saved(const T* saved, int64_t self, const Offer& offer) const {
    for (const Dup& d : dups_)
      if (d.index != self) offer(saved[d.slot], d.index);
  }

 private:
  struct Dup {
    int64_t index, slot;  // the duplicate row; the slot of its first row
    bool operator<(const Dup& o) const { return index < o.index; }
  };

  // Saves the scores of the first rows in [g0, g0 + cols) and gives each duplicate there the
  // score dup_score(saved row, its first row's slot).
  template <typename T, typename DupScore>
  void visit(T* s, int64_t rows, int64_t stride, int64_t g0, int64_t cols, T* saved, const DupScore& dup_score) const {
    if (dups_.empty()) return;
    const int64_t g1 = g0 + cols, n = slots();
    const int64_t f0 = std::lower_bound(firsts_.begin(), firsts_.end(), g0) - firsts_.begin();
    const int64_t f1 = std::lower_bound(firsts_.begin(), firsts_.end(), g1) - firsts_.begin();
    const auto d0 = std::lower_bound(dups_.begin(), dups_.end(), Dup{g0, 0});
    const auto d1 = std::lower_bound(dups_.begin(), dups_.end(), Dup{g1, 0});
    for (int64_t i = 0; i < rows; ++i) {
      T* row = s + i * stride - g0;
      for (int64_t f = f0; f < f1; ++f) saved[i * n + f] = row[firsts_[f]];
      for (auto it = d0; it != d1; ++it) row[it->index] = dup_score(saved + i * n, it->slot);
    }
  }
  std::vector<int64_t> firsts_;  // first rows that have duplicates, ascending
  std::vector<Dup> dups_;        // ascending index
};

// ---- cosine_topk ---------------------------------------------------------------------------

// Order of ranked items: higher score first, equal scores by ascending gallery index.
template <typename T>
struct Scored {
  T score;
  int64_t index;
  bool operator<(const Scored& o) const { return score > o.score || (score == o.score && index < o.index); }
};

// The best k of the items offered so far, in the ranking order. Candidates beating the
// current k-th best are appended without a branch into a buffer of 2k (+ one chunk of slack);
// a full buffer is pruned back to the best k with nth_element.
template <typename T>
class RunningTopK {
  static constexpr int64_t kChunk = 16;

 public:
  explicit RunningTopK(int64_t k) : k_(k), cand_(2 * k + kChunk) {}

  void reset() {
    size_ = 0;
    threshold_ = -std::numeric_limits<T>::infinity();
  }

  // Offers scores s[0, n) of gallery items base, base + 1, ...; `self` is never kept.
  SDML_CPU_CLONES void offer_block(const T* s, int64_t n, int64_t base, int64_t self) {
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t len = std::min(kChunk, n - t0);
      // Later items lose ties, so only a strictly higher score than the k-th best enters.
      T m = s[t0];
#pragma omp simd reduction(max : m)
      for (int64_t j = 1; j < len; ++j) m = s[t0 + j] > m ? s[t0 + j] : m;
      if (m <= threshold_) continue;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t index = base + t0 + j;
        cand_[size_] = {s[t0 + j], index};
        size_ += int64_t(s[t0 + j] > threshold_) & int64_t(index != self);
      }
      if (size_ >= 2 * k_) prune();
    }
  }

  // Writes the kept items best first (min(k, offered) of them).
  void finish(T* scores, int64_t* indices) {
    prune();
    std::sort(cand_.begin(), cand_.begin() + size_);
    for (int64_t j = 0; j < size_; ++j) {
      scores[j] = cand_[j].score;
      indices[j] = cand_[j].index;
    }
  }

  // Appends the kept items (unordered) to `out`.
  void finish_into(std::vector<Scored<T>>& out) {
    prune();
    out.insert(out.end(), cand_.begin(), cand_.begin() + size_);
  }

 private:
  void prune() {
    if (size_ <= k_) return;
    std::nth_element(cand_.begin(), cand_.begin() + (k_ - 1), cand_.begin() + size_);
    size_ = k_;
    threshold_ = cand_[k_ - 1].score;
  }

  int64_t k_, size_ = 0;
  std::vector<Scored<T>> cand_;
  T threshold_ = -std::numeric_limits<T>::infinity();
};

// Query tiles fewer than the threads (a few queries): each tile's gallery is split into this
// many ranges of whole blocks per thread, scored on different threads and merged. The GEMM calls
// (query tile x gallery block) are the same however the gallery is split, so are the scores, and
// the merge is exact: the results do not depend on the thread count.
constexpr int64_t kRangesPerThread = 4;

int64_t gallery_ranges(int64_t tiles, int64_t blocks) {
  const int64_t threads = at::get_num_threads();
  if (tiles >= kRangesPerThread * threads || tiles == 0) return 1;
  return std::max<int64_t>(1, std::min(blocks, (kRangesPerThread * threads + tiles - 1) / tiles));
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                   int64_t k, bool exclude_self, c10::string_view precision) {
  constexpr const char* op = "cosine_topk";
  if (use_cpu_bf16_topk(op, query_in, precision)) return cosine_topk_bf16_cpu(query_in, gallery_in, k, exclude_self);
  const auto [query, raw_gallery, gallery_norms] = embeddings_with_gallery_norms(op, query_in, gallery_in, exclude_self);
  check_cpu_dtype(op, query);
  const int64_t nq = query.size(0), ng = raw_gallery.size(0), d = query.size(1);
  check_topk_k(op, k, ranked_items(ng, exclude_self), exclude_self);
  // Fewer rows for a very large k (kCandidateBytes); Scored<T> is 16 bytes for float and double.
  const int64_t rows = std::min(tile_rows(nq, kBlockCols, query.element_size()),
                                std::max<int64_t>(kMinTileRows, kCandidateBytes / (2 * k * 16)));
  const int64_t tiles = (nq + rows - 1) / rows, blocks = (ng + kBlockCols - 1) / kBlockCols;
  const int64_t ranges = gallery_ranges(tiles, blocks);
  // One range per tile: the gallery normalized once. Several (few queries, where this per-call
  // copy of the whole gallery would cost more than the GEMMs): each block is normalized as it is
  // scored, into the thread's scratch, to the same values.
  const at::Tensor gallery = ranges > 1 ? raw_gallery : at::div(raw_gallery, gallery_norms);
  const DuplicateScores duplicates(duplicate_rows(gallery_in));
  const BlockGemm gemm(query.scalar_type());
  at::Tensor scores = at::empty({nq, k}, query.options());
  at::Tensor indices = at::empty({nq, k}, query.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "cosine_topk_cpu", [&] {
    static_assert(sizeof(Scored<scalar_t>) == 16);
    const int64_t slots = duplicates.slots();
    // One range: duplicates take their first row's score block by block (per-thread `saved`).
    // Several: they are masked in the ranges and offered in the merge, from the shared `saved`.
    std::vector<scalar_t> shared_saved(ranges > 1 ? nq * slots : 0);
    std::vector<std::vector<Scored<scalar_t>>> kept(ranges > 1 ? nq * ranges : 0);  // [query, range]
    struct Scratch {
      at::Tensor buffer, normalized;  // scores of a block; the normalized block (several ranges)
      std::vector<RunningTopK<scalar_t>> best;
      std::vector<scalar_t> saved;
    };
    const auto setup = [&] {
      return Scratch{at::empty({rows * kBlockCols}, query.options()),
                     at::empty({ranges > 1 ? kBlockCols : 0, d}, query.options()),
                     std::vector<RunningTopK<scalar_t>>(rows, RunningTopK<scalar_t>(k)),
                     std::vector<scalar_t>(ranges > 1 ? 0 : rows * slots)};
    };
    for_each_tile(tiles * ranges, setup, [&](Scratch& scratch, int64_t item) {
      const int64_t tile = item / ranges, range = item % ranges;
      std::vector<RunningTopK<scalar_t>>& best = scratch.best;
      const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
      const int64_t g_begin = range * blocks / ranges * kBlockCols;
      const int64_t g_end = std::min(ng, (range + 1) * blocks / ranges * kBlockCols);
      const at::Tensor q_tile = query.narrow(0, q0, nrows);
      for (int64_t i = 0; i < nrows; ++i) best[i].reset();
      for (int64_t g0 = g_begin; g0 < g_end; g0 += kBlockCols) {
        const int64_t ncols = std::min(kBlockCols, ng - g0);
        at::Tensor block = scratch.buffer.narrow(0, 0, nrows * ncols).view({nrows, ncols});
        at::Tensor g_block = gallery.narrow(0, g0, ncols);
        if (ranges > 1) {
          at::Tensor normalized = scratch.normalized.narrow(0, 0, ncols);
          g_block = at::div_out(normalized, g_block, gallery_norms.narrow(0, g0, ncols));
        }
        block = gemm.scores(q_tile, g_block, block);
        scalar_t* s = block.mutable_data_ptr<scalar_t>();
        if (ranges > 1) {
          duplicates.save_firsts_mask_dups(s, nrows, ncols, g0, ncols, shared_saved.data() + q0 * slots);
        } else {
          duplicates.apply(s, nrows, ncols, g0, ncols, scratch.saved.data());
        }
        for (int64_t i = 0; i < nrows; ++i) best[i].offer_block(s + i * ncols, ncols, g0, exclude_self ? q0 + i : -1);
      }
      for (int64_t i = 0; i < nrows; ++i) {
        if (ranges > 1) {
          best[i].finish_into(kept[(q0 + i) * ranges + range]);
        } else {
          best[i].finish(scores.mutable_data_ptr<scalar_t>() + (q0 + i) * k,
                         indices.mutable_data_ptr<int64_t>() + (q0 + i) * k);
        }
      }
    });
    if (ranges > 1) {
      at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
        std::vector<Scored<scalar_t>> all;
        for (int64_t qi = begin; qi < end; ++qi) {
          all.clear();
          for (int64_t r = 0; r < ranges; ++r) all.insert(all.end(), kept[qi * ranges + r].begin(), kept[qi * ranges + r].end());
          duplicates.offer_saved(shared_saved.data() + qi * slots, exclude_self ? qi : -1,
                                 [&](scalar_t score, int64_t index) { all.push_back({score, index}); });
          // every item is in a range's best k or a duplicate, so at least k candidates
          std::nth_element(all.begin(), all.begin() + (k - 1), all.end());
          std::sort(all.begin(), all.begin() + k);
          for (int64_t j = 0; j < k; ++j) {
            scores.mutable_data_ptr<scalar_t>()[qi * k + j] = all[j].score;
            indices.mutable_data_ptr<int64_t>()[qi * k + j] = all[j].index;
          }
        }
      });
    }
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

// Smallest and largest of s[0, n), n >= 1.
template <typename T>
SDML_CPU_CLONES std::pair<T, T> min_max(const T* s, int64_t n) {
  T lo = s[0], hi = s[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t t = 0; t < n; ++t) {
    lo = s[t] < lo ? s[t] : lo;
    hi = s[t] > hi ? s[t] : hi;
  }
  return {lo, hi};
}

// bucket_of[t] = min(int((s[t] - lo) * scale), last): monotone, s_a <= s_b implies
// bucket_of[a] <= bucket_of[b].
template <typename T>
SDML_CPU_CLONES void assign_buckets(const T* s, int64_t n, T lo, T scale, int32_t last, int32_t* bucket_of) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const int32_t b = int32_t((s[t] - lo) * scale);
    bucket_of[t] = b < last ? b : last;
  }
}

// An integer key per ranked item that orders like the ranking: key(a) > key(b) exactly when a
// ranks ahead of b (higher score, or equal score and lower index). The high half is the score's
// bits made order-preserving (-0 counted as +0), the low half the complemented index.
template <typename T> struct RankKey;
template <> struct RankKey<float> {
  using type = uint64_t;
  static constexpr type kTop = ~type{0};  // beats every finite score
  static type make(float v, int64_t t) {
    uint32_t bits;
    v += 0.0f;
    std::memcpy(&bits, &v, sizeof bits);
    bits ^= uint32_t(int32_t(bits) >> 31) | 0x80000000u;
    return (type(bits) << 32) | uint32_t(~uint32_t(t));
  }
};
template <> struct RankKey<double> {
  using type = unsigned __int128;
  static constexpr type kTop = ~type{0};
  static type make(double v, int64_t t) {
    uint64_t bits;
    v += 0.0;
    std::memcpy(&bits, &v, sizeof bits);
    bits ^= uint64_t(int64_t(bits) >> 63) | (uint64_t{1} << 63);
    return (type(bits) << 64) | uint64_t(~uint64_t(t));
  }
};

template <typename T>
SDML_CPU_CLONES void make_keys(const T* s, int64_t n, typename RankKey<T>::type* keys) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) keys[t] = RankKey<T>::make(s[t], t);
}

template <typename T>
class RelevantRanker {
  using Key = typename RankKey<T>::type;

 public:
  explicit RelevantRanker(int64_t n)
      : n_(n), buckets_(bucket_count(n)), bucket_of_(n), keys_(n), bucket_(buckets_), is_relevant_(n, 0) {}

  // Ranks (1-based, ascending) of the relevant items `rel` (gallery indices, not containing
  // `self`) in the ranking of scores s[0, n) that leaves out item `self` (-1: none).
  //
  // Each bucket keeps the keys of up to two relevant items. Every item falling into a bucket
  // is compared with both, without a branch (an empty slot holds a key no item beats).
  // Buckets with three or more relevant items ("crowded", rare unless scores tie massively)
  // set their items aside to be sorted.
  const std::vector<int64_t>& rank(const T* s, const std::vector<int64_t>& rel, int64_t self) {
    ranks_.resize(rel.size());
    if (rel.empty()) return ranks_;
    bucket_and_key(s);
    seat_relevant(rel);
    count_items(self);
    read_ranks();
    for (const int64_t t : rel) is_relevant_[t] = 0;
    return ranks_;
  }

 private:
  // Phase 1: every item's bucket (a monotone map of [min, max] onto the buckets) and rank key.
  void bucket_and_key(const T* s) {
    const auto [lo, hi] = min_max(s, n_);
    const T scale = hi > lo ? T(buckets_) / (hi - lo) : T(0);
    assign_buckets(s, n_, lo, scale, int32_t(buckets_ - 1), bucket_of_.data());
    make_keys(s, n_, keys_.data());
  }

  // Phase 2: the relevant items take the slots of their buckets (all empty on entry: the
  // previous call's read_ranks reset them); a third one makes the bucket crowded.
  void seat_relevant(const std::vector<int64_t>& rel) {
    for (const int64_t t : rel) {
      Bucket& home = bucket_[bucket_of_[t]];
      is_relevant_[t] = 1;
      if (home.relevant < 2) {
        home.key[home.relevant] = keys_[t];
      } else {
        home.key[0] = home.key[1] = RankKey<T>::kTop;
      }
      ++home.relevant;
    }
  }

  // Phase 3: one pass over all items, `self` left out: the histogram, the exact comparisons
  // with the slots of the item's bucket, and the items of crowded buckets set aside (sorted).
  void count_items(int64_t self) {
    const int32_t* bucket_of = bucket_of_.data();
    const Key* keys = keys_.data();
    Bucket* bucket = bucket_.data();
    crowded_.clear();
    for (int64_t t = 0; t < n_; ++t) {
      Bucket& home = bucket[bucket_of[t]];
      const Key key = keys[t];
      ++home.count;
      home.ahead[0] += key > home.key[0];
      home.ahead[1] += key > home.key[1];
      if (home.relevant > 2 && t != self) crowded_.push_back({bucket_of[t], key, t});  // rare
    }
    if (self >= 0) {
      Bucket& home = bucket[bucket_of[self]];
      --home.count;
      for (int i = 0; i < 2; ++i) home.ahead[i] -= keys[self] > home.key[i];
    }
    std::sort(crowded_.begin(), crowded_.end());
  }

  // Phase 4: buckets from the top: rank = 1 + items in higher buckets + items ahead in the
  // bucket. Each bucket is reset on the way for the next call.
  void read_ranks() {
    int64_t above = 0, j = 0;
    int64_t* ranks = ranks_.data();
    auto crowded = crowded_.cbegin();
    for (int64_t b = buckets_ - 1; b >= 0; --b) {
      Bucket& home = bucket_[b];
      if (home.relevant > 2) {
        for (int64_t place = 0; crowded != crowded_.cend() && crowded->bucket == b; ++crowded, ++place)
          if (is_relevant_[crowded->index]) ranks[j++] = 1 + above + place;
      } else if (home.relevant > 0) {
        const int64_t first = 1 + above + home.ahead[0];
        if (home.relevant == 1) {
          ranks[j++] = first;
        } else {
          const int64_t second = 1 + above + home.ahead[1];
          ranks[j++] = std::min(first, second);
          ranks[j++] = std::max(first, second);
        }
      }
      above += home.count;
      home = Bucket{};
    }
  }

  struct Bucket {
    int32_t count = 0;               // items in the bucket
    int32_t relevant = 0;            // relevant items in the bucket
    int32_t ahead[2] = {0, 0};       // items ranking ahead of each slot's relevant item
    Key key[2] = {RankKey<T>::kTop, RankKey<T>::kTop};  // the slots' relevant items
  };

  // An item of a crowded bucket; sorts by bucket (highest first), then ranking order.
  struct Crowded {
    int32_t bucket;
    Key key;
    int64_t index;
    bool operator<(const Crowded& o) const { return bucket != o.bucket ? bucket > o.bucket : key > o.key; }
  };

  // A power of two, at least 64, about n / kItemsPerBucket, at most kBucketBytes of buckets.
  static int64_t bucket_count(int64_t n) {
    int64_t b = 64;
    while (b * kItemsPerBucket < n && 2 * b * sizeof(Bucket) <= kBucketBytes) b <<= 1;
    return b;
  }

  int64_t n_, buckets_;
  std::vector<int32_t> bucket_of_;
  std::vector<Key> keys_;
  std::vector<Bucket> bucket_;
  std::vector<uint8_t> is_relevant_;
  std::vector<Crowded> crowded_;
  std::vector<int64_t> ranks_;
};

// Scores of a tile of query rows against the whole gallery, computed in column blocks whose
// output fits the L2 cache (the GEMM runs faster so), into a [rows, Ng] buffer; duplicates of
// gallery rows then get their first row's score.
template <typename T>
void score_tile(const at::Tensor& q_tile, const at::Tensor& gallery, const DuplicateScores& duplicates,
                at::Tensor& buffer, std::vector<T>& saved) {
  const int64_t nrows = q_tile.size(0), ng = gallery.size(0);
  const BlockGemm gemm(q_tile.scalar_type());
  for (int64_t g0 = 0; g0 < ng; g0 += kBlockCols) {
    const int64_t ncols = std::min(kBlockCols, ng - g0);
    at::Tensor block = buffer.narrow(0, 0, nrows).narrow(1, g0, ncols);  // row stride ng
    gemm.scores_into(q_tile, gallery.narrow(0, g0, ncols), block);
  }
  saved.resize(nrows * duplicates.slots());
  duplicates.apply(buffer.mutable_data_ptr<T>(), nrows, ng, 0, ng, saved.data());
}

// Writes rows [q0, q0 + rows) of the [rows, ng] scores s as columns of the [ng, nq] matrix out.
template <typename T>
void transpose_into(const T* s, int64_t rows, int64_t ng, T* out, int64_t nq, int64_t q0) {
  constexpr int64_t kStrip = 16;  // out rows written together, each advancing with i
  for (int64_t j0 = 0; j0 < ng; j0 += kStrip) {
    const int64_t j1 = std::min(ng, j0 + kStrip);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = j0; j < j1; ++j) out[j * nq + q0 + i] = s[i * ng + j];
  }
}

// Calls consume(qi, ranks) for every query, ranks as RelevantRanker::rank. Each thread takes
// tiles of query rows, scores a tile (score_tile) and ranks its rows. When `transposed` is not
// null, the scores are also written to it as an [Ng, Nq] matrix (the other direction's rows).
template <typename T, typename Relevance, typename Consume>
void for_each_query_ranks(const at::Tensor& query, const at::Tensor& gallery, const DuplicateScores& duplicates,
                          const Relevance& relevance, bool exclude_self, const Consume& consume,
                          T* transposed = nullptr) {
  const int64_t nq = query.size(0), ng = gallery.size(0);
  const int64_t rows = tile_rows(nq, ng, sizeof(T));
  const int64_t tiles = (nq + rows - 1) / rows;
  struct Scratch {
    at::Tensor buffer;
    std::unique_ptr<RelevantRanker<T>> ranker;
    std::vector<int64_t> rel;
    std::vector<T> saved;
  };
  const auto setup = [&] {
    return Scratch{at::empty({rows, ng}, query.options()), std::make_unique<RelevantRanker<T>>(ng), {}, {}};
  };
  for_each_tile(tiles, setup, [&](Scratch& scratch, int64_t tile) {
    const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
    score_tile<T>(query.narrow(0, q0, nrows), gallery, duplicates, scratch.buffer, scratch.saved);
    const T* s = scratch.buffer.template const_data_ptr<T>();
    if (transposed) transpose_into(s, nrows, ng, transposed, nq, q0);
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t qi = q0 + i, self = exclude_self ? qi : -1;
      relevance.collect(qi, self, scratch.rel);
      consume(qi, scratch.ranker->rank(s + i * ng, scratch.rel, self));
    }
  });
}

// Calls consume(qi, ranks) for every row qi of the [nq, ng] score matrix s (rows are modified:
// duplicates of gallery rows get their first row's score).
template <typename T, typename Relevance, typename Consume>
void for_each_row_ranks(T* s, int64_t nq, int64_t ng, const DuplicateScores& duplicates, const Relevance& relevance,
                        const Consume& consume) {
  const int64_t rows = std::max<int64_t>(1, (nq + kTilesPerThread * at::get_num_threads() - 1) /
                                                (kTilesPerThread * at::get_num_threads()));
  struct Scratch {
    std::unique_ptr<RelevantRanker<T>> ranker;
    std::vector<int64_t> rel;
    std::vector<T> saved;
  };
  const auto setup = [&] {
    return Scratch{std::make_unique<RelevantRanker<T>>(ng), {}, std::vector<T>(duplicates.slots())};
  };
  for_each_tile((nq + rows - 1) / rows, setup, [&](Scratch& scratch, int64_t tile) {
    for (int64_t qi = tile * rows; qi < std::min(nq, (tile + 1) * rows); ++qi) {
      duplicates.apply(s + qi * ng, 1, ng, 0, ng, scratch.saved.data());
      relevance.collect(qi, -1, scratch.rel);
      consume(qi, scratch.ranker->rank(s + qi * ng, scratch.rel, -1));
    }
  });
}

// Calls visit(relevance) with the labels' relevance rule (class ids or label bits) for queries
// with labels `query` against gallery items with labels `gallery`.
template <typename Visit>
void with_relevance(const RetrievalLabels& labels, bool swapped, const Visit& visit) {
  const at::Tensor& q = swapped ? labels.gallery : labels.query;
  const at::Tensor& g = swapped ? labels.query : labels.gallery;
  if (labels.multi_hot) {
    visit(LabelBitsRelevance(q, g));
  } else {
    visit(ClassIdRelevance(q, g));
  }
}

// Validates the common arguments and runs consume over every query's relevant ranks.
template <typename Consume>
void rank_relevant(const char* op, const at::Tensor& query_in, const at::Tensor& gallery_in,
                   const at::Tensor& query_labels, const at::Tensor& gallery_labels, bool exclude_self,
                   const Consume& consume) {
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  check_cpu_dtype(op, query);
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
  const Divisor divisor = parse_divisor(op, divisor_name);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t cutoff = resolve_k(op, k, ranked_items(gallery.size(0), exclude_self));
  at::Tensor ap = at::empty({query.size(0)}, query.options().dtype(at::kDouble));
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
  const Divisor divisor = parse_divisor(op, divisor_name);
  const Empty empty = parse_empty(op, empty_name);
  auto [a, b] = normalized_embeddings(op, a_in, b_in, /*exclude_self=*/false);
  check_cpu_dtype(op, a);
  SDML_CHECK_VALUE(a.size(0) > 0, op, ": a has no rows (nothing to rank for b's queries)");
  const RetrievalLabels labels = prepare_labels(op, a_labels, b_labels, a, b);
  const int64_t na = a.size(0), nb = b.size(0);
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
  check_cutoffs(op, k);
  const Empty empty = parse_empty(op, empty_name);
  const int64_t ranked = ranked_items(gallery.size(0), exclude_self), nk = k.size();
  const std::vector<int64_t> cutoffs(k.begin(), k.end());
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
