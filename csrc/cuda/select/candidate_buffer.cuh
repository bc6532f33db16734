#pragma once
// A block's running selection in shared memory: every item offered with a score at or above
// theta - margin is appended (warp-aggregated atomics); theta is the k-th best score kept so far
// (-inf until k items were seen). When the buffer fills, prune() sorts it (bitonic), sets theta
// and drops what falls below theta - margin. With margin 0 this is an exact top-k; with a
// margin it keeps every candidate a re-score within the margin could promote (see
// sdml/topk_plan.h). Every decision taken from the live count goes through prune() or
// settled_count(), which read it between barriers. The buffer overflows only when more than `cap` items lie within the margin
// of theta (massive exact ties); the caller then takes its fallback.
#include <cstdint>
#include <limits>

#include "bitonic.cuh"

namespace sdml::select {

template <typename S>
struct CandidateBuffer {
  S* score;          // [buffer] shared
  int32_t* index;    // [buffer] shared
  int* count;        // shared: live entries
  S* theta;          // shared: the running k-th best score
  int* scratch;      // shared: one int for prune()
  int buffer, k;
  S margin;

  // Called once by the whole block.
  __device__ void reset() {
    if (threadIdx.x == 0) {
      *count = 0;
      *theta = -std::numeric_limits<S>::infinity();
    }
    __syncthreads();
  }

  __device__ S limit() const { return *theta - margin; }

  // Called by every lane of a warp; appends (s, idx) where pred.
  __device__ void offer(bool pred, S s, int32_t idx) {
    const unsigned mask = __ballot_sync(0xffffffffu, pred);
    if (mask == 0) return;
    const int lane = threadIdx.x & 31, leader = __ffs(mask) - 1;
    int base = 0;
    if (lane == leader) base = atomicAdd(count, __popc(mask));
    base = __shfl_sync(0xffffffffu, base, leader);
    if (pred) {
      const int pos = base + __popc(mask & ((1u << lane) - 1u));
      score[pos] = s;
      index[pos] = idx;
    }
  }

  // Sorts the live entries best first and keeps those within the margin of the k-th (at least
  // k of them, or all when fewer). The whole block calls it and gets the new count (read before
  // a final barrier, so that no thread's next offer() races with another's read).
  __device__ int prune() {
    __syncthreads();
    const int n = *count;
    const int m = pow2_at_least(n > 0 ? n : 1);
    for (int i = n + threadIdx.x; i < m; i += blockDim.x) {
      score[i] = -std::numeric_limits<S>::infinity();
      index[i] = INT32_MAX;
    }
    __syncthreads();
    bitonic_sort_best_first(score, index, m);
    if (n >= k) {
      const S th = score[k - 1], lim = th - margin;
      // Sorted: exactly one i >= k - 1 is the last entry at or above lim.
      for (int i = k - 1 + threadIdx.x; i < n; i += blockDim.x)
        if (score[i] >= lim && (i + 1 == n || score[i + 1] < lim)) *scratch = i + 1;
      __syncthreads();
      if (threadIdx.x == 0) {
        *count = *scratch;
        *theta = th;
      }
    }
    __syncthreads();
    const int live = *count;
    __syncthreads();
    return live;
  }

  // The live count, read by the whole block before a barrier: a uniform value that no thread's
  // later offer() can race with. Call between a block's offers and its next decision.
  __device__ int settled_count() {
    __syncthreads();
    const int live = *count;
    __syncthreads();
    return live;
  }
};

}  // namespace sdml::select
