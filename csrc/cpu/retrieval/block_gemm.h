#pragma once
// The GEMM of one block of scores, q_tile [rows, d] times g_block [cols, d] transposed, run
// single-threaded on the calling thread (the kernels parallelise over tiles). float32 runs on the
// code measured fastest on this machine (sdml/cpu_gemm.h: MKL/BLAS, oneDNN or our AVX2 kernel,
// SDML_CPU_GEMM overrides); float64 on BLAS.
#include <ATen/core/Tensor.h>

#include "sdml/cpu_gemm.h"

namespace sdml::cpu_retrieval {

class BlockGemm {
 public:
  // Makes the process's GEMM choice on first use (it may time the candidates): construct it
  // outside parallel regions, once per call, and share it with the threads.
  explicit BlockGemm(at::ScalarType dtype);

  // The scores, in `out` [rows, cols] (any row stride) or in a fresh contiguous tensor.
  at::Tensor scores(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const;

  // Whether scores() runs our AVX2 kernel (sdml/panel_gemm.h): a caller scoring many blocks of one
  // gallery then packs it once and calls panel_gemm::scores itself, to the same bits.
  bool panel_kernel() const { return gemm_ == CpuGemm::Avx2; }

  // As scores(), always into `out` (a block of a wider buffer: the library measured fastest so).
  void scores_into(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const;

 private:
  CpuGemm gemm_ = CpuGemm::Blas, gemm_into_rows_ = CpuGemm::Blas;
};

}  // namespace sdml::cpu_retrieval
