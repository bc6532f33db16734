#pragma once
// Block-wide bitonic sort of (key, index) pairs in shared memory, best first: a higher key
// first, equal keys by ascending index (the ranking order of every retrieval op). n must be a
// power of two; the whole block calls it; entries past the live ones hold (-inf, INT_MAX)
// sentinels, which sort last. O(n log^2 n) compare-exchanges over blockDim.x threads.
#include <cstdint>

namespace sdml::select {

template <typename K>
__device__ __forceinline__ bool ranks_before(K ka, int32_t ia, K kb, int32_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

template <typename K>
__device__ void bitonic_sort_best_first(K* key, int32_t* index, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
        const int i = 2 * stride * (t / stride) + (t % stride), j = i + stride;
        // Blocks whose bit `size` is clear end best first, the others worst first; the last
        // pass (size == n) leaves the whole array best first.
        const bool best_first = (i & size) == 0;
        const bool swap = best_first ? ranks_before(key[j], index[j], key[i], index[i])
                                     : ranks_before(key[i], index[i], key[j], index[j]);
        if (swap) {
          const K k = key[i];
          key[i] = key[j];
          key[j] = k;
          const int32_t x = index[i];
          index[i] = index[j];
          index[j] = x;
        }
      }
      __syncthreads();
    }
  }
}

// The smallest power of two >= n (n >= 1).
__host__ __device__ __forceinline__ int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace sdml::select
