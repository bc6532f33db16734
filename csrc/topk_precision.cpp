// Host code of cosine_topk's precision modes on the CPU: which mode runs, the CPU's bf16 capability and
// the error bound of the bf16 mode.
#include "sdml/topk_precision.h"
#include "sdml/topk_plan.h"

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>

#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#include "sdml/checks.h"

namespace sdml {

namespace {

struct Bf16Units {
  bool present;
  std::string status;
};

bool capability(const std::unordered_map<std::string, c10::IValue>& caps, const char* name) {
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

Bf16Units detect_bf16_units() {
  const auto caps = at::cpu::get_cpu_capabilities();
  const bool amx = capability(caps, "amx_bf16") && capability(caps, "amx_tile");
  const bool avx512 = capability(caps, "avx512_bf16");
  if (!at::hasMKLDNN()) return {false, "no bf16 GEMM: torch was built without oneDNN"};
  if (!amx && !avx512)
    return {false, "no bf16 units (neither AMX-BF16 nor AVX512-BF16): precision=\"bf16\" runs the exact fp32 mode"};
  return {true, std::string("bf16 units: ") + (amx ? "AMX-BF16" : "") + (amx && avx512 ? " + " : "") +
                    (avx512 ? "AVX512-BF16" : "") + " (precision=\"bf16\" scores candidates on them)"};
}

const Bf16Units& bf16_units() {
  static const Bf16Units units = detect_bf16_units();
  return units;
}

bool disabled_by_environment() {
  const char* value = std::getenv("SDML_CPU_BF16");
  return value && (std::string_view(value) == "off" || std::string_view(value) == "0");
}

void warn_once(const std::string& message) {
  static std::mutex mutex;
  static std::set<std::string> warned;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (!warned.insert(message).second) return;
  }
  TORCH_WARN(message);
}

}  // namespace

bool cpu_bf16_units() { return bf16_units().present && !disabled_by_environment(); }

std::string cpu_bf16_status() {
  if (bf16_units().present && disabled_by_environment())
    return "bf16 units present but disabled by SDML_CPU_BF16=off: precision=\"bf16\" runs the exact fp32 mode";
  return bf16_units().status;
}

bool use_cpu_bf16_topk(const char* op, const at::Tensor& query, std::string_view precision) {
  const topk::Precision mode = topk::parse_precision(op, precision);
  if (mode == topk::Precision::Exact) return false;
  if (mode == topk::Precision::TF32) {
    warn_once(std::string(op) + ": precision=\"tf32\" is a GPU mode; on the CPU it runs the exact mode");
    return false;
  }
  if (!cpu_bf16_units()) {
    warn_once(std::string(op) + ": precision=\"bf16\" runs the exact mode on this CPU (" + cpu_bf16_status() + ")");
    return false;
  }
  // float64: the bf16 filter would hold, but the re-score must be float64's exact arithmetic;
  // 1-2 queries: a matrix-vector product, memory-bound, where bf16 gains little and the GEMM's
  // rounding is position-dependent. Both run the exact mode (documented, no warning).
  return query.scalar_type() == at::kFloat && query.dim() == 2 && query.size(0) >= 3;
}

// |s_bf16 - s_exact| for unit vectors q, g of width d, where s_exact is any float32 evaluation
// of q.g (exact mode's GEMM, any summation order) and s_bf16 the bf16 mode's first score:
// q, g rounded to bf16, products summed in float32 (AMX / AVX512-BF16 and ATen's fallback all
// accumulate in float32), the sum rounded to bf16 (at::mm's bf16 output). With u_b = 2^-8,
// u = 2^-24, gamma_d = d u / (1 - d u):
//   rounding the inputs:   |sum q~g~ - sum qg| <= (2 u_b + u_b^2) sum |q_i g_i| <= (2 u_b + u_b^2) |q||g|
//                          (Cauchy-Schwarz);
//   float32 accumulation:  <= gamma_d sum |q~_i g~_i| <= gamma_d (1 + u_b)^2 |q||g|, the same
//                          gamma_d |q||g| for the exact mode's float32 GEMM;
//   bf16 output:           <= u_b |s| <= u_b (1 + 3 u_b) |q||g|;
//   flushed denormals:     <= 2 d 2^-126 (AMX flushes bf16 denormal inputs and outputs).
// The normalized rows have |q|, |g| <= 1 + (d + 4) u (norm and division rounded in float32).
double bf16_score_bound(int64_t d) {
  const double ub = std::ldexp(1.0, -8), u = std::ldexp(1.0, -24);
  const double n = static_cast<double>(d);
  const double gamma = n * u / (1.0 - n * u);
  const double norms = std::pow(1.0 + (n + 4.0) * u, 2);
  const double relative = 2 * ub + ub * ub + gamma * (std::pow(1 + ub, 2) + 1) + ub * (1 + 3 * ub);
  return norms * relative * (1 + 1e-6) + 2 * n * std::ldexp(1.0, -126);
}

}  // namespace sdml
