#pragma once
// Which code runs the float32 GEMMs of the CPU kernels' tiles, chosen by measuring.
//
// Why measure: the fastest depends on the machine, not on its vendor alone. MKL runs its AVX2
// code on AMD CPUs (half the rate of oneDNN on an AVX-512 Zen 5), while on an Intel Xeon with
// AVX-512 it may beat oneDNN at the tiles' shapes, and torch builds differ in what they bundle;
// our own AVX2 kernel (sdml/panel_gemm.h) scores a gallery packed once per search. So on first use
// a process times them at a tile's shape with all its threads (a few tens of milliseconds), keeps
// the fastest for its lifetime (for cosine_topk's blocks, oneDNN or our kernel unless BLAS is
// more than ~5% faster: their rounding does not depend on where a product lies in the output,
// which keeps precision="bf16" bitwise equal to the exact mode), and stores the result in a small
// file in the user's cache directory for the next process on the same machine, torch and thread
// count.
//
// SDML_CPU_GEMM overrides: "auto" (the default: the cached or measured choice), "measure"
// (measure again, ignoring and rewriting the cache file), "blas" (at::mm: MKL / OpenBLAS),
// "onednn" (torch's mkldnn linear op; BLAS where this torch lacks it), "avx2" (our kernel; BLAS
// on a CPU without AVX2 and FMA). float64 always uses BLAS.
// The cache directory is SDML_CACHE_DIR, else $XDG_CACHE_HOME/sdml_ext, else ~/.cache/sdml_ext;
// SDML_CACHE_DIR=off keeps the choice in the process only. A cache file that cannot be read, is
// corrupt, or belongs to another machine, torch or thread count is ignored and rewritten.
#include <ATen/core/Tensor.h>

#include <string>

namespace sdml {

enum class CpuGemm { Blas, OneDnn, Avx2 };

const char* cpu_gemm_name(CpuGemm gemm);

// Two uses, measured apart: a block written to its own contiguous output (cosine_topk), and a
// block written into the rows of a wider buffer (the metric ops' [rows, Ng] tiles), where oneDNN's
// fresh output must be copied.
struct CpuGemmChoice {
  CpuGemm gemm = CpuGemm::Blas;            // contiguous block outputs
  CpuGemm gemm_into_rows = CpuGemm::Blas;  // outputs inside a wider buffer
  std::string how;              // "measured", "cached", "SDML_CPU_GEMM=blas", ...
  double blas_gflops = 0;       // measured rates behind a measured or cached choice (all threads);
  double onednn_gflops = 0;     // 0 when not measured
  double blas_into_rows_gflops = 0;
  double onednn_into_rows_gflops = 0;
  double avx2_gflops = 0;            // 0 when not measured (a CPU without AVX2 / FMA)
  double avx2_into_rows_gflops = 0;
  std::string shape;            // the measured tile GEMM: "rows x cols x d"
  int threads = 0;              // threads the rates were measured with
  std::string cache_file;       // "" when there is no disk cache
  std::string cache_note;       // what happened to the cache file (read, written, ignored: why)
  std::string machine;          // the cache key: CPU model, ISA, torch version, threads
};

// The float32 tile GEMM choice of this process: decided on the first call (thread-safe; call it
// outside parallel regions), then fixed. Raises ValueError naming SDML_CPU_GEMM for a bad value.
const CpuGemmChoice& cpu_gemm_choice();

// out [rows, cols] = a [rows, d] times b [cols, d] transposed (float32 or float64, contiguous
// rows), run by `gemm` on the calling thread's BLAS / oneDNN threads (Avx2: on the calling thread,
// b packed per call). Returns the result: `out` (any row stride), or for oneDNN a fresh contiguous
// tensor.
at::Tensor cpu_gemm_nt(CpuGemm gemm, const at::Tensor& a, const at::Tensor& b, at::Tensor& out);

}  // namespace sdml
