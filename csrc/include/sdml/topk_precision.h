#pragma once
// The precision modes of cosine_topk and what the CPU offers for them (host code in
// csrc/topk_precision.cpp, the CPU bf16 kernel in csrc/cpu/retrieval/topk_bf16.cpp;
// the argument itself is parsed by topk::parse_precision, sdml/topk_plan.h, for CPU and CUDA alike).
//
//   "exact": float32 (float64) GEMM scores, the reference every mode answers to.
//   "bf16":  candidates scored in bf16 (oneDNN drives AMX / AVX512-BF16 units), then a margin of
//            them re-scored in float32: the exact mode's ids and scores. Runs as "exact" on float64
//            inputs, for fewer than 3 queries, and on CPUs without bf16 units (with a warning).
//   "tf32":  a GPU mode; on the CPU it runs as "exact" (with a warning).
#include <string>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace sdml {

// Whether this CPU has bf16 dot-product units that oneDNN drives (AMX-BF16 or AVX512-BF16, from
// cpuinfo at run time), unless SDML_CPU_BF16=off; and a one-line account of it for build_info().
bool cpu_bf16_units();
std::string cpu_bf16_status();

// For cosine_topk on the CPU: whether `precision` runs the bf16 kernel for these inputs. Warns
// once per process when a requested fast mode runs as exact for want of hardware.
bool use_cpu_bf16_topk(const char* op, const at::Tensor& query, std::string_view precision);

// Bound on |bf16-mode score - exact-mode score| for one (query, item) pair of unit vectors of
// width d (see the derivation in csrc/topk_precision.cpp).
double bf16_score_bound(int64_t d);

// The bf16 kernel: (scores [Nq, k], indices [Nq, k]) as cosine_topk's exact mode returns them.
// query [Nq, d] and gallery [Ng, d] float32, Nq >= 3.
std::tuple<at::Tensor, at::Tensor> cosine_topk_bf16_cpu(const at::Tensor& query, const at::Tensor& gallery, int64_t k,
                                                        bool exclude_self);

}  // namespace sdml
