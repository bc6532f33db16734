#pragma once
// Host-side plan of the CUDA AP kernel that ranks only the relevant items (csrc/cuda/ap/ap_ranks.cuh),
// compiled into every build so that CPU tests exercise it.
//
// Per query row, one block: the row's relevant items (R of them) are collected into shared memory
// and sorted (bitonic, by score desc then index asc); every other item is placed among them by a
// binary search (how many relevant items rank before it) and counted in a histogram of R + 1 bins.
// The h-th relevant item (h = 1..R) then sits at rank p_h = h + (items before it) = h + the
// histogram's prefix sum up to h - 1, the exact rank a stable full sort would give, so AP@k
// follows from sdml/retrieval_math.h with no sort of the row and one read of its scores per pass.
#include <cstdint>

namespace sdml::ap {

constexpr int kRankThreads = 512;

// The relevant-item capacity per row: the smallest power of two >= max_relevant whose shared
// memory (key + index + histogram: capacity * (score_bytes + 8) + 4 bytes) fits smem_optin less
// 4 KiB for the kernel's static scratch; 0 when not even max_relevant = 1 fits. Rows with more
// relevant items than the capacity take the sort-based kernel.
int64_t rank_capacity(int64_t max_relevant, int64_t score_bytes, int64_t smem_optin);

// Dynamic shared memory bytes of the kernel at this capacity.
inline int64_t rank_smem_bytes(int64_t capacity, int64_t score_bytes) {
  return capacity * (score_bytes + 8) + 4;
}

}  // namespace sdml::ap
