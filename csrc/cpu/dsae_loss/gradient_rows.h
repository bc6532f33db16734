#pragma once
// The loss's input-gradient rows, out = coef * (a - b) (a = x_hat_j, b = x_j), written either
// through the cache or with non-temporal (streaming) stores.
//
// Why streaming: a gradient as large as the input is written once and read only later, by the
// next layer's backward. An ordinary store first reads the line it writes into the cache (the
// read-for-ownership), so writing B x D values moves them twice over the memory bus; a streaming
// store writes whole lines straight to memory. Where the gradient would fit in the cache, ordinary
// stores keep it there for its reader instead (see stream_gradient_rows).
//
// Both paths compute every element as the same two roundings (a - b, then times coef), so the
// choice never changes a bit of the result.
#include <cstdint>

namespace sdml::dsae_cpu {

// out[i] = coef * (a[i] - b[i]) for i < n; with stream, full vectors go out as streaming stores
// (AVX-512 or AVX, whichever the CPU has; ordinary stores on other CPUs). A thread that streamed
// calls stream_fence() before other threads may read what it wrote.
void scaled_diff_row(const float* a, const float* b, float* out, float coef, int64_t n, bool stream);
void scaled_diff_row(const double* a, const double* b, double* out, double coef, int64_t n, bool stream);

// Orders this thread's streaming stores before its later stores (an sfence); a no-op elsewhere.
void stream_fence();

// Whether a gradient of `bytes` is written with streaming stores: when this CPU has them and the
// gradient is larger than the share of the last-level cache that one core can count on, so it
// would be evicted before its reader gets to it anyway. SDML_LOSS_STREAM=0/1 overrides.
bool stream_gradient_rows(int64_t bytes);

// What stream_gradient_rows decided from, for build_info(): "avx512" / "avx" / "none", the cache
// share in bytes, and whether the override is set.
struct StreamPolicy {
  const char* isa;
  int64_t cache_share_bytes;
  int override_value;  // -1: not set, else 0 or 1
};
StreamPolicy stream_policy();

}  // namespace sdml::dsae_cpu
