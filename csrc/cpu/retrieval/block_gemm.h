#pragma once
// The GEMM of one block of scores, q_tile [rows, d] times g_block [cols, d] transposed, run
// single-threaded on the calling thread (the kernels parallelise over tiles).
//
// The float32 GEMM goes through oneDNN (torch's mkldnn::_linear_pointwise op) where torch has
// it: oneDNN picks its kernels by CPU feature, while MKL runs its AVX2 code on AMD CPUs, at half
// the rate on AVX-512 machines such as AMD Zen 5 (measured: ~100 vs ~220 GFLOP/s per core at
// these block shapes). float64, or SDML_CPU_GEMM=blas, uses at::mm_out (MKL / OpenBLAS).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace sdml::cpu_retrieval {

class BlockGemm {
 public:
  explicit BlockGemm(at::ScalarType dtype);

  // The scores, in `out` [rows, cols] (any row stride) or in a fresh contiguous tensor.
  at::Tensor scores(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const;

  // As scores(), always into `out`.
  void scores_into(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const;

 private:
  using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              c10::string_view, c10::List<std::optional<at::Scalar>>,
                              std::optional<c10::string_view>);
  static std::optional<c10::TypedOperatorHandle<LinearFn>> find_onednn();

  const c10::TypedOperatorHandle<LinearFn>* linear_ = nullptr;
};

}  // namespace sdml::cpu_retrieval
