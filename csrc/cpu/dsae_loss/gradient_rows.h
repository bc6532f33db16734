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
#include <string>

namespace sdml::dsae_cpu {

// out[i] = coef * (a[i] - b[i]) for i < n; with stream, full vectors go out as streaming stores
// (AVX-512 or AVX, whichever the CPU has; ordinary stores on other CPUs). A thread that streamed
// calls stream_fence() before other threads may read what it wrote.
void scaled_diff_row(const float* a, const float* b, float* out, float coef, int64_t n, bool stream);
void scaled_diff_row(const double* a, const double* b, double* out, double coef, int64_t n, bool stream);

// Orders this thread's streaming stores before its later stores (an sfence); a no-op elsewhere.
void stream_fence();

// Whether a pass that reads and writes `pass_bytes` in all (x_hat and x read, the gradient
// written) writes its gradient with streaming stores: when the CPU has them and the pass does not
// fit in the part of the last-level cache that this process's threads may count on (the cache's
// size times the share of the CPUs sharing it that run torch's threads). A pass that fits keeps
// its gradient in the cache for the next layer's backward (and its lines are usually still cached
// from the previous step, so ordinary stores read nothing from memory); one that does not evicts
// the gradient before its reader comes, and streaming saves the read-for-ownership.
// SDML_LOSS_STREAM=0 / 1 overrides (ValueError for another value).
bool stream_gradient_rows(int64_t pass_bytes);

// The policy in one line, for build_info().
std::string stream_policy_note();

}  // namespace sdml::dsae_cpu
