// Host-side plan of the CUDA AP kernel (see sdml/ap_plan.h). No CUDA here.
#include "sdml/ap_plan.h"

namespace sdml::ap {

int64_t rank_capacity(int64_t max_relevant, int64_t score_bytes, int64_t smem_optin) {
  const int64_t budget = smem_optin - 4096;
  int64_t cap = 1;
  while (cap < max_relevant) cap <<= 1;
  if (rank_smem_bytes(cap, score_bytes) <= budget) return cap;
  // The largest power of two that fits: rows above it take the sort-based kernel.
  cap = 1;
  while (rank_smem_bytes(cap * 2, score_bytes) <= budget) cap <<= 1;
  return rank_smem_bytes(cap, score_bytes) <= budget ? cap : 0;
}

}  // namespace sdml::ap
