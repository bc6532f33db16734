#pragma once
// AP@k from the ranks of the relevant items only (the method: sdml/ap_plan.h). Two kernels:
// count_relevant_kernel (R per query, to size the shared memory) and ap_ranks_kernel (a block
// per row of a score tile). Included by csrc/cuda/retrieval.cu, which owns the tiles.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <limits>

#include "../relevance.cuh"
#include "../select/bitonic.cuh"
#include "sdml/ap_plan.h"
#include "sdml/retrieval_math.h"

namespace sdml::ap {

// Score types as compared: half and bfloat16 widen exactly to float (order preserved).
template <typename T> struct Key { using type = float; };
template <> struct Key<double> { using type = double; };

// relevant[qi] = how many gallery items are relevant to query qi (itself left out under
// exclude_self); a block per query. relevant: [Nq] int64.
template <typename Relevance>
__global__ void __launch_bounds__(kRankThreads)
    count_relevant_kernel(Relevance relevance, int64_t ng, bool exclude_self, int64_t* __restrict__ relevant) {
  using Sum = cub::BlockReduce<int64_t, kRankThreads>;
  __shared__ typename Sum::TempStorage storage;
  const int64_t qi = blockIdx.x, self = exclude_self ? qi : -1;
  int64_t n = 0;
  for (int64_t j = threadIdx.x; j < ng; j += blockDim.x) n += j != self && relevance(qi, j);
  const int64_t total = Sum(storage).Sum(n);
  if (threadIdx.x == 0) relevant[qi] = total;
}

struct RankArgs {
  int64_t q0, ng, cutoff, capacity;
  bool exclude_self;
  retrieval::Divisor divisor;
  retrieval::Empty empty;
  const int64_t* relevant;  // [Nq] from count_relevant_kernel
  double* ap;               // [Nq]
};

// A block per tile row r (query qi = q0 + r), scores [rows, ng]. Rows with more relevant items
// than the capacity are skipped (the caller ranks them with the sort-based kernel).
template <typename T, typename Relevance>
__global__ void __launch_bounds__(kRankThreads)
    ap_ranks_kernel(const T* __restrict__ scores, Relevance relevance, RankArgs a) {
  using K = typename Key<T>::type;
  using Scan = cub::BlockScan<int32_t, kRankThreads>;
  using Sum = cub::BlockReduce<double, kRankThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Sum::TempStorage sum_storage;
  __shared__ int count;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t r = blockIdx.x, qi = a.q0 + r, self = a.exclude_self ? qi : -1;
  const int64_t R = a.relevant[qi];
  if (R > a.capacity) return;  // uniform
  const T* row = scores + r * a.ng;
  if (R == 0) {
    if (threadIdx.x == 0) a.ap[qi] = retrieval::average_precision_from(0.0, 0, 0, a.divisor, a.empty);
    return;
  }
  const int cap = static_cast<int>(a.capacity);
  K* key = reinterpret_cast<K*>(smem);
  int32_t* index = reinterpret_cast<int32_t*>(smem + sizeof(K) * cap);
  int32_t* hist = index + cap;  // [R + 1]
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  // 1. The relevant items, in any order (warp-aggregated appends).
  for (int64_t base = 0; base < a.ng; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool rel = j < a.ng && j != self && relevance(qi, j);
    const unsigned mask = __ballot_sync(0xffffffffu, rel);
    if (mask) {
      const int lane = threadIdx.x & 31, leader = __ffs(mask) - 1;
      int at = 0;
      if (lane == leader) at = atomicAdd(&count, __popc(mask));
      at = __shfl_sync(0xffffffffu, at, leader);
      if (rel) {
        const int pos = at + __popc(mask & ((1u << lane) - 1u));
        key[pos] = static_cast<K>(row[j]);
        index[pos] = static_cast<int32_t>(j);
      }
    }
  }
  __syncthreads();
  const int n = static_cast<int>(R);  // == count
  const int m = select::pow2_at_least(n);
  for (int i = n + threadIdx.x; i < m; i += blockDim.x) {
    key[i] = -std::numeric_limits<K>::infinity();
    index[i] = INT32_MAX;
  }
  for (int i = threadIdx.x; i <= n; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  // 2. Best first: score desc, index asc (the ranking order).
  select::bitonic_sort_best_first(key, index, m);
  // 3. Every other item: how many relevant items rank before it.
  const K worst_key = key[n - 1];
  const int32_t worst_index = index[n - 1];
  for (int64_t j = threadIdx.x; j < a.ng; j += blockDim.x) {
    if (j == self) continue;
    const K s = static_cast<K>(row[j]);
    const int32_t jj = static_cast<int32_t>(j);
    if (select::ranks_before(worst_key, worst_index, s, jj)) continue;  // after every relevant item
    if (relevance(qi, j)) continue;
    int lo = 0, hi = n;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (select::ranks_before(key[mid], index[mid], s, jj)) lo = mid + 1; else hi = mid;
    }
    atomicAdd(&hist[lo], 1);
  }
  __syncthreads();
  // 4. An item with m relevant items before it precedes the relevant items m, m + 1, ... (0-based),
  // so the (i + 1)-th relevant item has sum_{m <= i} hist[m] other items before it:
  // p = i + 1 + that inclusive prefix sum.
  double part = 0;
  int within = 0;
  int32_t before = 0;
  for (int start = 0; start < n; start += blockDim.x) {
    const int i = start + threadIdx.x;  // the (i + 1)-th relevant item
    const int32_t v = i < n ? hist[i] : 0;
    int32_t inclusive, total;
    Scan(scan_storage).InclusiveSum(v, inclusive, total);
    if (i < n) {
      const int64_t h = i + 1, p = h + before + inclusive;
      if (p <= a.cutoff) {
        part += retrieval::precision_term(h, p);
        ++within;
      }
    }
    before += total;
    __syncthreads();
  }
  const double sum = Sum(sum_storage).Sum(part);
  __syncthreads();
  const int64_t r_within = static_cast<int64_t>(Sum(sum_storage).Sum(double(within)) + 0.5);
  if (threadIdx.x == 0) a.ap[qi] = retrieval::average_precision_from(sum, r_within, R, a.divisor, a.empty);
}

}  // namespace sdml::ap
