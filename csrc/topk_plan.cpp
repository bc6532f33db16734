// Host-side plan of the CUDA cosine top-k: precision modes, the candidate margin and the launch
// sizes (see sdml/topk_plan.h). No CUDA here: CPU tests call these through sdml_ext._C.
#include "sdml/topk_plan.h"

#include <algorithm>
#include <cmath>

#include "sdml/checks.h"

namespace sdml::topk {
namespace {

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace

Precision parse_precision(const char* op, std::string_view precision) {
  if (precision == "exact") return Precision::Exact;
  if (precision == "tf32") return Precision::TF32;
  if (precision == "bf16") return Precision::BF16;
  SDML_CHECK_VALUE(false, op, ": precision must be \"exact\", \"tf32\" or \"bf16\", got \"", precision,
                   "\" (exact: float32 scores without TF32; tf32 / bf16: candidates on tensor cores, re-scored "
                   "exactly)");
  return Precision::Exact;
}

double unit_roundoff(InputKind kind) {
  switch (kind) {
    case InputKind::Float64: return std::ldexp(1.0, -53);
    case InputKind::Float32: return std::ldexp(1.0, -24);
    case InputKind::Float16: return std::ldexp(1.0, -11);
    case InputKind::BFloat16: return std::ldexp(1.0, -8);
  }
  return 1.0;
}

double gamma_n(int64_t n, double u) {
  const double nu = double(n) * u;
  return nu < 1.0 ? nu / (1.0 - nu) : INFINITY;
}

Margin candidate_margin(Precision precision, InputKind input, int64_t d) {
  const double u64 = unit_roundoff(InputKind::Float64), u32 = unit_roundoff(InputKind::Float32);
  const bool wide = input == InputKind::Float64;
  const double u_acc = wide ? u64 : u32;
  // Rows normalized in the input dtype: ||q|| <= 1 + nu (the norm's own error and the rounding
  // of every entry to the input format), so sum |q_i g_i| <= ||q|| ||g|| <= (1 + nu)^2.
  const double nu = unit_roundoff(input) + gamma_n(d + 2, u_acc);
  const double norms = (1 + nu) * (1 + nu);
  Margin m{};
  // The re-score: float64 products (exact for narrower inputs) summed in float64.
  m.delta_det = gamma_n(d + 1, u64) * norms;
  if (precision == Precision::Exact) {
    m.delta_low = gamma_n(d + 1, u_acc) * norms;
  } else {
    // Each factor rounded to the tensor-core format (TF32 may truncate: 2^-10; bfloat16 is
    // rounded to nearest by the copy: 2^-8), float64 inputs through float32 first; products
    // summed in float32 by tensor cores, whose additions may truncate (2 u32 per addition).
    const double u_in = precision == Precision::TF32 ? std::ldexp(1.0, -10) : unit_roundoff(InputKind::BFloat16);
    const double e = wide && precision == Precision::TF32 ? (1 + u32) * (1 + u_in) - 1 : u_in;
    const double inputs = (1 + e) * (1 + e);
    m.delta_low = ((inputs - 1) + gamma_n(d + 1, 2 * u32) * inputs) * norms;
  }
  // The limit theta - margin is formed in the workspace's format: 4 of its units at 1 cover
  // that subtraction's rounding (scores are at most ~1 in magnitude).
  const double u_ws = precision == Precision::Exact && wide ? u64 : u32;
  m.margin = 2 * (m.delta_low + m.delta_det) * (1 + 1e-3) + 4 * u_ws;
  return m;
}

Plan plan_topk(int64_t nq, int64_t ng, int64_t k, int64_t score_bytes, int64_t workspace_elements,
               int64_t sm_count, int64_t smem_optin, bool fast) {
  constexpr const char* op = "cosine_topk";
  SDML_CHECK_VALUE(ng < (int64_t{1} << 31) - 1, op, ": on CUDA the gallery must have fewer than 2^31 - 1 rows, got ",
                   ng);
  SDML_CHECK_VALUE(nq >= 0 && k >= 1 && k <= ng, op, ": k = ", k, " must lie in [1, ", ng, "]");
  SDML_CHECK_VALUE(score_bytes == 4 || score_bytes == 8, op, ": score_bytes must be 4 or 8, got ", score_bytes);
  Plan p{};
  p.sweep = kSelectThreads * (16 / score_bytes);
  // A list holds a row segment's top k and every item within the margin of its k-th: twice k in
  // exact mode (its margin is a few float32 ulps), four times k in the tensor-core modes (their
  // margin, ~0.016 for bfloat16, holds ~3k items of random 512-d data at k = 1,000 of 10^6).
  const int64_t cap_needed = fast ? std::max<int64_t>(4 * k, 2048) : std::max<int64_t>(2 * k, 512);
  p.buffer = std::min(next_pow2(cap_needed + p.sweep), std::max(kMaxBuffer, next_pow2(2 * k + p.sweep)));
  p.cap = p.buffer - p.sweep;
  p.select_smem = p.buffer * (score_bytes + 4);
  p.merge_smem = p.buffer * (score_bytes + 4 + 8);
  // 1 KiB of the opt-in limit is left for the kernels' static shared memory.
  p.fallback = k > kMaxSelectK || p.cap < 2 * k || p.merge_smem > smem_optin - 1024;

  const int64_t W = std::max<int64_t>(workspace_elements, p.sweep);
  const int64_t vec = 16 / score_bytes;
  const int64_t ld_full = round_up(ng, vec);
  const int64_t rows = std::max<int64_t>(nq, 1);
  if (ld_full * std::min<int64_t>(rows, 64) <= W) {
    p.block_cols = ng;
    p.ld = ld_full;
    p.tile_rows = std::max<int64_t>(1, std::min<int64_t>({rows, W / ld_full, 8192}));
  } else {
    p.tile_rows = std::min<int64_t>(rows, 512);
    p.block_cols = std::max<int64_t>(p.sweep, W / p.tile_rows / p.sweep * p.sweep);
    p.block_cols = std::min(p.block_cols, ng);
    p.ld = round_up(p.block_cols, vec);
    p.tile_rows = std::max<int64_t>(1, std::min<int64_t>(p.tile_rows, W / p.ld));
  }
  // Enough selection blocks to fill the device (4 per multiprocessor) when the tile has few
  // rows, but segments long enough that merging their lists stays cheap.
  const int64_t target = 4 * std::max<int64_t>(sm_count, 1);
  const int64_t per_row = (target + p.tile_rows - 1) / p.tile_rows;
  const int64_t min_segment = std::max<int64_t>(8 * p.cap, 4 * p.sweep);
  p.segments = std::max<int64_t>(1, std::min<int64_t>(per_row, p.block_cols / min_segment));
  p.segment_cols = round_up((p.block_cols + p.segments - 1) / p.segments, p.sweep);
  p.segments = (p.block_cols + p.segment_cols - 1) / p.segment_cols;
  return p;
}

int64_t fallback_rows(int64_t nq, int64_t ng, int64_t workspace_elements) {
  return std::max<int64_t>(1, std::min<int64_t>(nq, workspace_elements / (2 * std::max<int64_t>(ng, 1))));
}

int64_t default_workspace_elements(int64_t free_bytes, int64_t score_bytes) {
  const int64_t quarter = free_bytes / 4 / std::max<int64_t>(score_bytes, 1);
  return std::max<int64_t>(int64_t{1} << 16, std::min<int64_t>(int64_t{1} << 28, quarter));
}

}  // namespace sdml::topk
