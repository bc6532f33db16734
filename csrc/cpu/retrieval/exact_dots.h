#pragma once
// The exact kernel's float32 GEMM arithmetic, reproduced one (query, item) pair at a time: the
// bf16 top-k (precision="bf16") re-scores its candidates with it, reading each candidate's gallery
// row in place instead of gathering rows for a GEMM.
//
// The model: a score is the float32 sum, in order, of the partial sums of consecutive chunks of
// `chunk` coordinates, each partial a chain of fused multiply-adds in coordinate order from zero.
// oneDNN's float32 kernels compute so (measured: one chain for d <= 512, chunks of 512 for d up
// to 1024, of 1024 above; at calls of >= 3 rows and >= 5 columns). Nothing here assumes it: for
// each call shape of the exact kernel a probe compares the model, every product of a random call,
// bit for bit with the GEMM itself, and the bf16 kernel uses the model only where it matched.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "sdml/cpu_gemm.h"

namespace sdml::cpu_retrieval {

// Up to kDotLanes pairs of one query: its row q, the gallery rows g + idx[c] * d (c < n), their
// scores into out[c].
constexpr int64_t kDotLanes = 16;
struct DotGroup {
  const float* q;
  const int64_t* idx;
  int64_t n;
  float* out;
};

// Appends the groups of one query's items idx[0, n) (ascending) to `groups`, scores into out.
void append_dot_groups(const float* q, const int64_t* idx, int64_t n, float* out, std::vector<DotGroup>& groups);

// Scores every pair of the groups by the model (gallery g [*, d]), on the calling thread.
void exact_dot_groups(const DotGroup* groups, int64_t count, const float* g, int64_t d, int64_t chunk);

// What a probe of one call shape found: the chunk of the exact GEMM (0: the model does not
// reproduce it), and the seconds of one call of that shape by the GEMM, of the model on all its
// pairs, and of the bf16 GEMM of the same shape (for choosing between the modes; 0 if not timed;
// the best of three, in the running thread's CPU time where the system has it).
struct ExactDotProbe {
  int64_t chunk = 0;
  double gemm_s = 0, dots_s = 0, bf16_s = 0;
};

// Probes the GEMM `gemm` at calls of rows x cols x d (once per process and shape; cached). The
// GEMM runs as the exact kernel runs it: inside an active parallel region (single-threaded) when
// `parallel_region`, else on the calling thread with its threads. Construct nothing per thread:
// call it outside parallel regions.
ExactDotProbe probe_exact_dots(CpuGemm gemm, int64_t rows, int64_t cols, int64_t d, bool parallel_region, bool timed);

}  // namespace sdml::cpu_retrieval
