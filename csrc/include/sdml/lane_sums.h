#pragma once
// Row reductions whose bits do not depend on the vector width (CPU kernels of the loss and the
// training step): element i goes to partial sum i % kLanes, and the partial sums are added
// pairwise in a fixed order. 32 lanes: two AVX-512 (four AVX2) accumulators in flight, and the
// same bits in every clone of SDML_CPU_CLONES.
#include <cstdint>

namespace sdml::lanes {

constexpr int64_t kLanes = 32;

// Sum of kLanes partial sums, pairwise in a fixed order (lane is overwritten).
template <typename A>
inline A sum_lanes(A* lane) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
  return lane[0];
}

}  // namespace sdml::lanes
