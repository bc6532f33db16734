#include "block_gemm.h"

#include <ATen/ops/mm.h>

#include <cstdlib>
#include <string_view>

namespace sdml::cpu_retrieval {

BlockGemm::BlockGemm(at::ScalarType dtype) {
  static const std::optional<c10::TypedOperatorHandle<LinearFn>> linear = find_onednn();
  if (dtype == at::kFloat && linear) linear_ = &*linear;
}

at::Tensor BlockGemm::scores(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const {
  if (linear_) return linear_->call(q_tile, g_block, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  at::mm_out(out, q_tile, g_block.t());
  return out;
}

void BlockGemm::scores_into(const at::Tensor& q_tile, const at::Tensor& g_block, at::Tensor& out) const {
  const at::Tensor s = scores(q_tile, g_block, out);
  if (!s.is_same(out)) out.copy_(s);
}

std::optional<c10::TypedOperatorHandle<BlockGemm::LinearFn>> BlockGemm::find_onednn() {
  const char* choice = std::getenv("SDML_CPU_GEMM");
  if (choice && std::string_view(choice) == "blas") return std::nullopt;
  const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
  return handle->typed<LinearFn>();
}

}  // namespace sdml::cpu_retrieval
