#pragma once
// How the CPU retrieval kernels split the work: tiles of query rows, taken one at a time by the
// threads from a shared counter, each scored against the gallery in blocks of columns.
//
// The threads run the GEMM of a tile single-threaded, so they never wait for each other (which
// matters on a shared, oversubscribed machine: a GEMM or TensorIterator op called outside a
// parallel region starts its own OpenMP team per call, and with one core taken a thread waits at
// every barrier: a single query against 100,000 items took 20x its GEMM time so).
//
// at::parallel_for is OpenMP code inline in torch's headers: a source that includes this header
// must be compiled with -fopenmp (CMakeLists.txt), or the loop runs on one thread.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "sdml/cpu_blas.h"

namespace sdml::cpu_retrieval {

// Query rows per tile: enough rows for GEMM efficiency, fewer when that would leave a thread
// without kTilesPerThread tiles to balance (threads take tiles dynamically), and a score buffer
// of at most kTileBytes. Gallery columns per GEMM block: the block's output (rows x
// kBlockCols) fits the L2 cache.
constexpr int64_t kTileBytes = 64 << 20;
constexpr int64_t kMinTileRows = 16, kMaxTileRows = 256;
constexpr int64_t kBlockCols = 1024;
constexpr int64_t kTilesPerThread = 4;

// Rows per query tile for nq queries whose scores are `cols` wide, of `elem` bytes each.
inline int64_t tile_rows(int64_t nq, int64_t cols, size_t elem) {
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

// Query tiles fewer than the threads (a few queries): each tile's gallery is split into this
// many ranges of whole blocks per thread, scored on different threads and merged. The GEMM calls
// (query tile x gallery block) are the same however the gallery is split, so are the scores, and
// the merge is exact: the results do not depend on the thread count.
constexpr int64_t kRangesPerThread = 4;

// Gallery ranges per query tile, for `tiles` query tiles and `blocks` gallery blocks.
inline int64_t gallery_ranges(int64_t tiles, int64_t blocks) {
  const int64_t threads = at::get_num_threads();
  if (tiles >= kRangesPerThread * threads || tiles == 0) return 1;
  return std::max<int64_t>(1, std::min(blocks, (kRangesPerThread * threads + tiles - 1) / tiles));
}

}  // namespace sdml::cpu_retrieval
