// Host code of cosine_topk's precision modes on the CPU: which mode runs, the CPU's bf16 capability and
// the error bound of the bf16 mode.
#include "sdml/topk_precision.h"
#include "sdml/topk_plan.h"

#include <cmath>
#include <limits>
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
  // The bound below assumes at::mm's bf16 product runs on oneDNN (float32 accumulation, one
  // rounding to bf16); torch.backends.mkldnn.enabled = False would send it elsewhere.
  if (!at::globalContext().userEnabledMkldnn()) {
    warn_once(std::string(op) + ": precision=\"bf16\" runs the exact mode: oneDNN is disabled (torch.backends.mkldnn)");
    return false;
  }
  // float64: the bf16 filter would hold, but the re-score must be float64's exact arithmetic;
  // 1-2 queries: a matrix-vector product, memory-bound, where bf16 gains little and the GEMM's
  // rounding is position-dependent. Both run the exact mode (documented, no warning).
  return query.scalar_type() == at::kFloat && query.dim() == 2 && query.size(0) >= 3;
}

namespace {
bool exact_filter_disabled() {
  const char* value = std::getenv("SDML_CPU_EXACT_FILTER");
  return value && (std::string_view(value) == "off" || std::string_view(value) == "0");
}
}  // namespace

namespace {
thread_local bool exact_kernel_only = false;
}  // namespace
ExactKernelOnly::ExactKernelOnly() : was_(exact_kernel_only) { exact_kernel_only = true; }
ExactKernelOnly::~ExactKernelOnly() { exact_kernel_only = was_; }
bool ExactKernelOnly::active() { return exact_kernel_only; }

bool use_cpu_bf16_filter(const at::Tensor& query, int64_t gallery_rows) {
  return !ExactKernelOnly::active() && gallery_rows > kExactFilterMinItems && !exact_filter_disabled() && cpu_bf16_units() &&
         at::globalContext().userEnabledMkldnn() && query.scalar_type() == at::kFloat && query.dim() == 2 &&
         query.size(0) >= 3;
}

std::string cpu_exact_filter_status() {
  if (!cpu_bf16_units()) return "off: no bf16 units (the exact mode is the float32 kernel alone)";
  if (exact_filter_disabled()) return "off: SDML_CPU_EXACT_FILTER=off (the exact mode is the float32 kernel alone)";
  return "on: the exact mode filters galleries of > " + std::to_string(kExactFilterMinItems) +
         " items with the bf16 pass where its re-score is proven bit for bit the float32 kernel's and "
         "measured cheaper (same ids and scores); SDML_CPU_EXACT_FILTER=off turns it off";
}

// The bf16 mode's error bound. Notation: q, g are the exact mode's normalized float32 rows (the
// bf16 kernel starts from the same rows, bit for bit), q~, g~ their bf16 copies (rounded to nearest
// even, subnormals flushed to zero, so that every bf16 unit and ATen's fallback see the same
// values), e_q = q~ - q and e_g = g~ - g (exact). A = the float32 sum of the products q~_i g~_i, S =
// A rounded to bf16 (at::mm's bf16 output), s = the exact mode's float32 dot product of q and g.
// With u = 2^-24, u_b = 2^-8, gamma_d = d u / (1 - d u), tiny = 2^-126 (the least normal float):
//
//   |S - A|         <= u_b / (1 - u_b) |S| + tiny      rounding A to bf16 (round to nearest: A =
//                      S (1 + t), |t| <= u_b / (1 - u_b) covers either form of the model); a flushed
//                      subnormal output is off by < tiny;
//   |A - q~.g~|     <= gamma_d sum |q~_i g~_i| + 2 d tiny <= gamma_d |q~||g~| + 2 d tiny
//                      (each product of two bf16 values is exact in float32 unless it underflows,
//                      flushed by AMX / AVX512-BF16: < tiny each; any order or grouping of the d
//                      terms' sum, fused or not, with round-to-nearest; flushed partial sums: < tiny
//                      each; Cauchy-Schwarz);
//   |q~.g~ - q.g|   =  |q.e_g + e_q.g + e_q.e_g| <= |q||e_g| + |e_q||g| + |e_q||e_g|   (Cauchy-Schwarz;
//                      exact real arithmetic);
//   |s - q.g|       <= gamma_d |q||g| + 2 d tiny       (any float32 dot product of length d; the tiny
//                      term covers a thread that flushes denormals).
//
// So |S - s| <= rho |S| + D with rho = u_b / (1 - u_b) and
//   D = |q||e_g| + |e_q||g| + |e_q||e_g| + gamma_d (|q~||g~| + |q||g|) + (4 d + 1) tiny.
// For unit rows |e_x| is about 0.42 u_b (rounding errors of d elements add in quadrature), so D is
// about 0.9 u_b where the worst case (|e_x| = u_b |x|) would be 2 u_b; the output rounding is
// relative to the score, u_b |S|, not u_b.
// The row terms are computed in double from the rows (bf16_rows in cpu/retrieval/) and rounded up
// by a relative (d + 4) 2^-52, more than the error of a double sum of d squares and its root; the
// few double operations here are rounded up by 2^-40.
double bf16_output_rounding() {
  const double ub = std::ldexp(1.0, -8);
  return ub / (1 - ub);
}

double bf16_pair_bound(const Bf16RowTerms& q, const Bf16RowTerms& g, int64_t d) {
  const double u = std::ldexp(1.0, -24), n = static_cast<double>(d);
  const double gamma = n * u / (1.0 - n * u);
  const double D = q.norm * g.err + q.err * g.norm + q.err * g.err + gamma * (q.norm_bf16 * g.norm_bf16 + q.norm * g.norm) +
                   (4 * n + 1) * std::ldexp(1.0, -126);
  return D * (1 + std::ldexp(1.0, -40));
}

// Exact scores lie in [lower(S), upper(S)], lower(S) = S - rho |S| - D, upper(S) = S + rho |S| + D,
// both increasing in S (rho < 1). The k items of the best bf16 scores have exact scores >=
// lower(kappa), so the exact k-th best is >= lower(kappa), and an item that reaches it has
// upper(S) >= lower(kappa): S + rho |S| >= L = kappa - rho |kappa| - 2 D, i.e. S >= L / (1 + rho)
// for L >= 0 and S >= L / (1 - rho) for L < 0. Ties with the k-th best count (>=): the exact mode
// breaks them by index, which the re-score sees.
float bf16_candidate_threshold(float kappa, double D) {
  const double rho = bf16_output_rounding(), k = kappa;
  double L = k - rho * std::fabs(k) - 2 * D;
  L -= std::fabs(L) * std::ldexp(1.0, -40) + std::ldexp(1.0, -140);  // the double arithmetic's rounding, downward
  double t = L >= 0 ? L / (1 + rho) : L / (1 - rho);
  t -= std::fabs(t) * std::ldexp(1.0, -40) + std::ldexp(1.0, -140);
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

}  // namespace sdml
