#include "block_gemm.h"

namespace sdml::cpu_retrieval {

BlockGemm::BlockGemm(at::ScalarType dtype) {
  if (dtype == at::kFloat) {
    gemm_ = cpu_gemm_choice().gemm;
    gemm_into_rows_ = cpu_gemm_choice().gemm_into_rows;
  }
}

at::Tensor BlockGemm::scores(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const {
  return cpu_gemm_nt(gemm_, q_tile, g_block, out);
}

void BlockGemm::scores_into(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const {
  const at::Tensor s = cpu_gemm_nt(gemm_into_rows_, q_tile, g_block, out);
  if (!s.is_same(out)) out.copy_(s);
}

}  // namespace sdml::cpu_retrieval
