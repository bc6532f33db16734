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

// The bf16 mode's error bound, per (query, item) pair (derived in csrc/topk_precision.cpp).
// S is the bf16 mode's first score of the pair (bf16 copies of the normalized rows, products summed
// in float32, the sum rounded to bf16), s the exact mode's float32 score. For every pair:
//     |S - s| <= rho |S| + D(q, g),  rho = bf16_output_rounding(),  D = bf16_pair_bound(q, g, d),
// from each row's rounding terms: its norm |x|, the norm of its bf16 rounding error |x~ - x|, and
// the norm of its bf16 copy |x~| (upper bounds, computed from the rows themselves). D grows with
// every term, so the gallery's largest terms bound D for every item at once.
struct Bf16RowTerms {
  double norm = 0, err = 0, norm_bf16 = 0;
};
double bf16_output_rounding();
double bf16_pair_bound(const Bf16RowTerms& q, const Bf16RowTerms& g, int64_t d);

// The least bf16 score an item needs to possibly be among a query's exact top k, where kappa is
// the k-th best bf16 score among the query's ranked items and D the query's pair bound: every item
// whose exact score can reach the exact k-th best has S >= this (rounded down to float). A kappa
// that is a lower bound of the k-th best (a running one) gives a lower, still valid threshold.
float bf16_candidate_threshold(float kappa, double D);

// For tests, the bf16 kernel's parts (csrc/cpu/retrieval/): the bf16 copy of float32 rows x
// [n, d] and each row's terms [n, 3] float64 (|x|, |x~ - x|, |x~|); the scores of q [d] with rows
// g[idx[c]] by the model of the exact kernel's GEMM with chunk `chunk` (exact_dots.h); the chunk a
// probe finds for this process's top-k GEMM at calls of rows x cols x d (0: not reproduced).
std::tuple<at::Tensor, at::Tensor> cpu_bf16_rows(const at::Tensor& x);
at::Tensor cpu_exact_dots(const at::Tensor& q, const at::Tensor& g, const at::Tensor& idx, int64_t chunk);
int64_t cpu_exact_dots_chunk(int64_t rows, int64_t cols, int64_t d);

// The bf16 kernel: (scores [Nq, k], indices [Nq, k]) as cosine_topk's exact mode returns them.
// query [Nq, d] and gallery [Ng, d] float32, Nq >= 3. as_filter: the exact mode's own fast path
// (use_cpu_bf16_filter): the bf16 pass runs only where its re-score is proven bit for bit the
// exact kernel's (the pairwise model, exact_dots.h) and measured cheaper; otherwise the exact
// kernel runs, so the answer is the exact kernel's own, bit for bit, either way.
std::tuple<at::Tensor, at::Tensor> cosine_topk_bf16_cpu(const at::Tensor& query, const at::Tensor& gallery, int64_t k,
                                                        bool exclude_self, bool as_filter = false);

// For cosine_topk's exact mode on the CPU: whether to try the bf16 kernel as a filter (the answer
// stays the exact kernel's bit for bit: see cosine_topk_bf16_cpu). Where the CPU has bf16 units,
// for float32 inputs of >= 3 queries and a gallery large enough for the filter to pay
// (kExactFilterMinItems), unless SDML_CPU_EXACT_FILTER=off (read at each call: the pure float32
// kernel, for comparisons) or the call comes from within the bf16 kernel itself.
constexpr int64_t kExactFilterMinItems = 16384;
// While alive on a thread, cosine_topk's exact mode there is the float32 kernel alone: the bf16
// kernel's own calls of the exact mode (its fallbacks) must not come back to it.
class ExactKernelOnly {
 public:
  ExactKernelOnly();
  ~ExactKernelOnly();
  ExactKernelOnly(const ExactKernelOnly&) = delete;
  ExactKernelOnly& operator=(const ExactKernelOnly&) = delete;
  static bool active();

 private:
  bool was_;
};
bool use_cpu_bf16_filter(const at::Tensor& query, int64_t gallery_rows);
std::string cpu_exact_filter_status();

}  // namespace sdml
