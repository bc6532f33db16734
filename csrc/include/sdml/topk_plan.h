#pragma once
// Host-side plan of the CUDA cosine top-k (csrc/cuda/topk/cosine_topk.cu), compiled into every
// build so that CPU tests exercise it: the precision modes, the rounding-error margin that makes
// a low-precision candidate pass exact, and the tiling / launch sizes.
//
// The CUDA top-k never sorts a row. Per query tile and gallery block a GEMM writes low-precision
// scores s_low into a workspace; a selection kernel streams each score once and keeps, per
// (row, gallery segment), every item with s_low >= theta - margin, theta the running k-th best
// s_low (a shared-memory candidate buffer, pruned by a bitonic sort when full). The per-segment
// lists are merged per row; the survivors are re-scored by a deterministic dot product
// (products and sum in float64, a fixed order) and the best k by (re-score desc, index asc) are
// returned. With |s_low - s| <= delta_low and |s_det - s| <= delta_det for the exact cosine s of
// the normalized rows, every item of the true top-k by s_det has
//   s_low >= T_low - 2 (delta_low + delta_det)      (T_low: the k-th best s_low of the row),
// so margin = 2 (delta_low + delta_det) loses no item: every mode returns the same ids, those of
// s_det (Cauchy-Schwarz bounds each delta by a multiple of ||q|| ||g|| ~ 1).
#include <cstdint>
#include <string_view>

namespace sdml::topk {

// How the candidate scores are computed: "exact" (float32 GEMM without TF32; float64 for
// float64 inputs), "tf32" (float32 GEMM on TF32 tensor cores) or "bf16" (bfloat16 copies of
// the normalized rows, float32 output).
enum class Precision : int { Exact = 0, TF32 = 1, BF16 = 2 };

// Parses the op's `precision` argument; a ValueError naming it otherwise.
Precision parse_precision(const char* op, std::string_view precision);

// Input element kinds the bounds depend on.
enum class InputKind : int { Float64 = 0, Float32 = 1, Float16 = 2, BFloat16 = 3 };

// Unit roundoff of a floating format (2^-p, p = significand bits including the implicit one).
double unit_roundoff(InputKind kind);

// gamma_n(u) = n u / (1 - n u): the relative error bound of an n-term dot product.
double gamma_n(int64_t n, double u);

// The bound on |s_low - s| and |s_det - s| for rows of dimension d normalized in `input`, and
// margin = 2 (delta_low + delta_det) (with a 1e-3 relative safety factor).
struct Margin {
  double delta_low, delta_det, margin;
};
Margin candidate_margin(Precision precision, InputKind input, int64_t d);

// Largest k the selection kernels keep in shared memory; larger k take the chunked fallback
// (torch.topk's radix selection for the k-th low score, then the same candidate re-scoring).
constexpr int64_t kMaxSelectK = 2048;

// Threads of the selection kernels.
constexpr int kSelectThreads = 256;

// The launch plan of one call.
struct Plan {
  int64_t tile_rows;     // query rows per tile (GEMM M)
  int64_t block_cols;    // gallery columns per GEMM block (GEMM N)
  int64_t ld;            // workspace row stride (block_cols rounded up to a 16-byte multiple)
  int64_t segments;      // selection segments per row and block
  int64_t segment_cols;  // columns per segment (a multiple of sweep)
  int64_t sweep;         // items a selection block reads per step (threads x one 16-byte vector)
  int64_t buffer;        // candidate buffer entries (a power of two)
  int64_t cap;           // list capacity = buffer - sweep (>= 2k)
  int64_t select_smem;   // dynamic shared memory bytes of the segment kernel
  int64_t merge_smem;    // dynamic shared memory bytes of the merge / finish kernel
  bool fallback;         // k > kMaxSelectK: every row takes the chunked fallback
};

// Plans a call: nq x ng scores of d-dim rows, k kept; score_bytes 4 (float32 workspace) or 8;
// workspace_elements the most scores one tile may hold; sm_count the device's multiprocessors;
// smem_optin the most shared memory a block may opt in to; fast: a tensor-core mode, whose wider
// margin keeps more candidates per row (lists of >= 4k, at most kMaxBuffer entries, rather than
// >= 2k). Raises a ValueError naming the argument when the sizes exceed what the kernels address
// (int32 gallery indices).
Plan plan_topk(int64_t nq, int64_t ng, int64_t k, int64_t score_bytes, int64_t workspace_elements,
               int64_t sm_count, int64_t smem_optin, bool fast = false);

// The largest candidate buffer (entries): the merge kernel's shared memory is 12-16 bytes each.
constexpr int64_t kMaxBuffer = 8192;

// Rows per chunk of the fallback (scores of `rows` x ng must fit the workspace; at least 1).
int64_t fallback_rows(int64_t nq, int64_t ng, int64_t workspace_elements);

// The default workspace: 2^28 scores (1 GiB in float32), less when the device has little free
// memory (a quarter of it), never below one sweep of rows.
int64_t default_workspace_elements(int64_t free_bytes, int64_t score_bytes);

}  // namespace sdml::topk
