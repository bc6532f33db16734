// CUDA cosine_topk: GEMM tiles, a selection that never sorts a row, an exact re-score of the
// survivors (the plan, the margin and why it is rigorous: sdml/topk_plan.h).
//
// Per query tile (plan.tile_rows rows) and gallery block (plan.block_cols columns):
//   1. at::mm_out writes the tile's low-precision scores into a reused workspace [rows, ld];
//   2. select_segments_kernel: a block per (row, segment) streams its scores once (16-byte
//      loads) through a shared-memory CandidateBuffer and writes a list of the segment's
//      candidates (its top-k and every item within the margin of its k-th);
//   3. merge_lists_kernel: a block per row merges the segment lists with the row's running list
//      (the candidates of the earlier gallery blocks); after the last block it re-scores the
//      survivors (float64 dot products in a fixed order: det_dot) and writes the best k by
//      (re-score desc, index asc).
// Rows whose candidates overflow a buffer (more than plan.cap items within the margin: massive
// exact ties), and every row when k > kMaxSelectK, take the chunked fallback: a GEMM of a few
// rows against the whole gallery, torch.topk for the k-th low score, every candidate above it
// less the margin re-scored by the same det_dot, and a stable sort of the candidates only.
// Exact duplicate gallery rows get bit-identical re-scores (same values, same order of
// operations), so they tie and come in ascending index order without any duplicate detection.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "../launch.cuh"
#include "../select/candidate_buffer.cuh"
#include "sdml/checks.h"
#include "sdml/retrieval.h"
#include "sdml/topk_plan.h"

namespace sdml {
namespace {

using select::CandidateBuffer;
using topk::Plan;
using topk::Precision;
constexpr int kThreads = topk::kSelectThreads;

// ---- the deterministic re-score --------------------------------------------------------------

// q . g over d entries in float64: lane j sums entries j, j + 32, ... in order, then a fixed
// butterfly; every lane returns the same value, and the same inputs always give the same bits.
template <typename T>
__device__ __forceinline__ double det_dot(const T* __restrict__ q, const T* __restrict__ g, int64_t d) {
  const int lane = threadIdx.x & 31;
  double acc = 0;
  for (int64_t j = lane; j < d; j += 32) acc = fma(static_cast<double>(q[j]), static_cast<double>(g[j]), acc);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// ---- 16-byte loads ---------------------------------------------------------------------------

template <typename S> struct Vec;
template <> struct Vec<float> { using type = float4; static constexpr int n = 4; };
template <> struct Vec<double> { using type = double2; static constexpr int n = 2; };

template <typename S>
__device__ __forceinline__ void load_vec(const S* p, S (&v)[Vec<S>::n]) {
  const typename Vec<S>::type x = __ldg(reinterpret_cast<const typename Vec<S>::type*>(p));
  if constexpr (Vec<S>::n == 4) {
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  } else {
    v[0] = x.x; v[1] = x.y;
  }
}

// One block per (row, segment) of the tile: scores ws[r, c0:c1) of gallery items g0 + c.
// ws: [rows, ld] workspace scores; lists: [rows, lists_per_row, cap] scores / indices and
// [rows, lists_per_row] counts, this kernel filling slots 0 .. segments - 1; overflow: [Nq].
template <typename S>
__global__ void __launch_bounds__(kThreads)
    select_segments_kernel(const S* __restrict__ ws, int64_t ld, int64_t cols, int64_t segment_cols, int segments,
                           int64_t q0, int64_t g0, bool exclude_self, int k, S margin, int buffer, int cap,
                           S* __restrict__ list_score, int32_t* __restrict__ list_index,
                           int32_t* __restrict__ list_count, int lists_per_row, int32_t* __restrict__ overflow) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int count, scratch;
  __shared__ S theta;
  constexpr int V = Vec<S>::n;
  const int64_t r = blockIdx.x / segments, seg = blockIdx.x % segments;
  const int64_t qi = q0 + r, self = exclude_self ? qi : -1;
  const int64_t c0 = seg * segment_cols, c1 = c0 + segment_cols < cols ? c0 + segment_cols : cols;
  S* score = reinterpret_cast<S*>(smem);
  int32_t* index = reinterpret_cast<int32_t*>(smem + sizeof(S) * buffer);
  CandidateBuffer<S> buf{score, index, &count, &theta, &scratch, buffer, k, margin};
  buf.reset();
  const S* row = ws + r * ld;
  const int sweep = kThreads * V;
  bool overflowed = false;
  int live = 0;
  for (int64_t base = c0; base < c1; base += sweep) {
    if (live + sweep > buffer && (live = buf.prune()) + sweep > buffer) {
      overflowed = true;
      break;
    }
    const int64_t c = base + int64_t(threadIdx.x) * V;
    S v[V];
    if (c + V <= c1) {
      load_vec<S>(row + c, v);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = c + j < c1 ? row[c + j] : S(0);
    }
    const S lim = buf.limit();
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t gi = g0 + c + j;
      buf.offer(c + j < c1 && v[j] >= lim && gi != self, v[j], static_cast<int32_t>(gi));
    }
    live = buf.settled_count();
  }
  if (!overflowed) overflowed = buf.prune() > cap;
  const int64_t slot = r * lists_per_row + seg;
  const int n = overflowed ? 0 : count;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    list_score[slot * cap + i] = score[i];
    list_index[slot * cap + i] = index[i];
  }
  if (threadIdx.x == 0) {
    list_count[slot] = n;
    if (overflowed) overflow[qi] = 1;
  }
}

// One block per row of the tile: merges the row's lists (slots 0 .. lists_per_row - 1, the
// last being the running list of earlier gallery blocks). Not finishing: writes the survivors
// to the running slot. Finishing: re-scores them (query_r [Nq, d], gallery_r [Ng, d], the
// normalized rows in T) and writes the best k to out_score (float64) / out_index [Nq, k].
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads)
    merge_lists_kernel(S* __restrict__ list_score, int32_t* __restrict__ list_index, int32_t* __restrict__ list_count,
                       int lists_per_row, int cap, int64_t q0, int k, S margin, int buffer,
                       int32_t* __restrict__ overflow, bool finish, const T* __restrict__ query_r,
                       const T* __restrict__ gallery_r, int64_t d, double* __restrict__ out_score,
                       int64_t* __restrict__ out_index) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int count, scratch;
  __shared__ S theta;
  const int64_t r = blockIdx.x, qi = q0 + r;
  if (overflow[qi]) return;  // uniform; the fallback redoes this row
  S* score = reinterpret_cast<S*>(smem);
  double* det = reinterpret_cast<double*>(smem + sizeof(S) * buffer);
  int32_t* index = reinterpret_cast<int32_t*>(smem + (sizeof(S) + sizeof(double)) * buffer);
  CandidateBuffer<S> buf{score, index, &count, &theta, &scratch, buffer, k, margin};
  buf.reset();
  bool overflowed = false;
  int live = 0;
  const int step = blockDim.x;
  for (int l = 0; l < lists_per_row && !overflowed; ++l) {
    const int64_t slot = r * lists_per_row + l;
    const int n = list_count[slot];
    for (int base = 0; base < n; base += step) {
      if (live + step > buffer && (live = buf.prune()) + step > buffer) {
        overflowed = true;
        break;
      }
      const int i = base + threadIdx.x;
      const S s = i < n ? list_score[slot * cap + i] : S(0);
      const int32_t gi = i < n ? list_index[slot * cap + i] : 0;
      buf.offer(i < n && s >= buf.limit(), s, gi);
      live = buf.settled_count();
    }
  }
  if (!overflowed) overflowed = buf.prune() > cap;
  if (overflowed) {
    if (threadIdx.x == 0) overflow[qi] = 1;
    return;
  }
  const int n = count;  // settled: prune() ended with barriers and nothing is offered since
  if (!finish) {
    const int64_t slot = r * lists_per_row + lists_per_row - 1;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      list_score[slot * cap + i] = score[i];
      list_index[slot * cap + i] = index[i];
    }
    if (threadIdx.x == 0) list_count[slot] = n;
    return;
  }
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* q = query_r + qi * d;
  for (int i = warp; i < n; i += warps) {
    const double s = det_dot<T>(q, gallery_r + int64_t(index[i]) * d, d);
    if ((threadIdx.x & 31) == 0) det[i] = s;
  }
  const int m = select::pow2_at_least(n > 0 ? n : 1);
  __syncthreads();
  for (int i = n + threadIdx.x; i < m; i += blockDim.x) {
    det[i] = -std::numeric_limits<double>::infinity();
    index[i] = INT32_MAX;
  }
  __syncthreads();
  select::bitonic_sort_best_first(det, index, m);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    out_score[qi * k + j] = det[j];
    out_index[qi * k + j] = index[j];
  }
}

// det_dot of pairs: row rows[p] of query_r against gallery item cols[p]; a warp per pair.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rescore_pairs_kernel(const T* __restrict__ query_r, const T* __restrict__ gallery_r, int64_t d,
                         const int64_t* __restrict__ rows, const int64_t* __restrict__ cols, int64_t pairs,
                         double* __restrict__ out) {
  const int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (p >= pairs) return;  // whole warps leave together
  const double s = det_dot<T>(query_r + rows[p] * d, gallery_r + cols[p] * d, d);
  if ((threadIdx.x & 31) == 0) out[p] = s;
}

// ---- host side -------------------------------------------------------------------------------

// Sets cuBLAS's TF32 permission for the scope of one GEMM and restores it.
class CublasTF32 {
 public:
  explicit CublasTF32(bool allow) : saved_(at::globalContext().allowTF32CuBLAS()) {
    if (saved_ != allow) at::globalContext().setAllowTF32CuBLAS(allow);
  }
  ~CublasTF32() {
    if (at::globalContext().allowTF32CuBLAS() != saved_) at::globalContext().setAllowTF32CuBLAS(saved_);
  }
  CublasTF32(const CublasTF32&) = delete;
  CublasTF32& operator=(const CublasTF32&) = delete;

 private:
  bool saved_;
};

// out [rows, cols] (any row stride) = a [rows, d] . b [cols, d]^T in the mode's arithmetic;
// bfloat16 inputs give float32 output.
void low_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, Precision precision) {
  const CublasTF32 tf32(precision == Precision::TF32);
  if (a.scalar_type() == at::kBFloat16) {
    at::mm_out(out, a, b.t(), at::kFloat);  // bfloat16 tensor cores, float32 output (torch >= 2.8)
  } else {
    at::mm_out(out, a, b.t());
  }
}

at::Tensor low_gemm(const at::Tensor& a, const at::Tensor& b, Precision precision, at::ScalarType score_dtype) {
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(score_dtype));
  low_gemm(out, a, b, precision);
  return out;
}

topk::InputKind input_kind(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return topk::InputKind::Float64;
    case at::kHalf: return topk::InputKind::Float16;
    case at::kBFloat16: return topk::InputKind::BFloat16;
    default: return topk::InputKind::Float32;
  }
}

// The operands of one call: low-precision GEMM inputs, the re-score inputs (float32, or float64
// for float64 inputs) and the workspace dtype.
struct Operands {
  at::Tensor q_low, g_low, q_r, g_r;
  at::ScalarType score_dtype;
  Precision precision;
  double margin;
};

// The fallback for `rows` (int64 query indices): chunks of rows against the whole gallery.
void topk_fallback(const Operands& o, const at::Tensor& rows, int64_t k, bool exclude_self, int64_t workspace,
                   at::Tensor& out_score, at::Tensor& out_index) {
  const int64_t ng = o.g_low.size(0), d = o.q_r.size(1);
  const int64_t chunk = topk::fallback_rows(rows.size(0), ng, workspace);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < rows.size(0); r0 += chunk) {
    const int64_t m = std::min(chunk, rows.size(0) - r0);
    const at::Tensor ids = rows.narrow(0, r0, m);
    at::Tensor s = low_gemm(o.q_low.index_select(0, ids), o.g_low, o.precision, o.score_dtype);
    const at::Tensor local = at::arange(m, ids.options());
    const at::Tensor self = local.mul(ng).add(ids);  // flat positions of (i, ids[i])
    if (exclude_self) s.view({-1}).index_fill_(0, self, -std::numeric_limits<double>::infinity());
    // The k-th best low score of each row: the least of torch.topk's k values (radix selection).
    const at::Tensor kth = std::get<0>(at::topk(s, k, 1, true, false)).amin(1, true);
    at::Tensor mask = s.ge(kth.sub(o.margin));
    if (exclude_self) mask.view({-1}).index_fill_(0, self, false);
    const at::Tensor counts = mask.sum(1);
    const at::Tensor nz = at::nonzero(mask);  // row-major: ascending column within a row
    const at::Tensor pair_rows = nz.select(1, 0).contiguous(), cols = nz.select(1, 1).contiguous();
    const int64_t pairs = nz.size(0);
    const at::Tensor query_rows = ids.index_select(0, pair_rows);
    at::Tensor det = at::empty({pairs}, s.options().dtype(at::kDouble));
    if (pairs > 0) {
      const int64_t blocks = (pairs * 32 + kThreads - 1) / kThreads;
      AT_DISPATCH_FLOATING_TYPES(o.q_r.scalar_type(), "cosine_topk_rescore", [&] {
        rescore_pairs_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            o.q_r.const_data_ptr<scalar_t>(), o.g_r.const_data_ptr<scalar_t>(), d,
            query_rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), pairs,
            det.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    // Within each row: re-score descending, equal re-scores by ascending column (stable sorts).
    const at::Tensor by_score = std::get<1>(at::sort(det, /*stable=*/true, 0, /*descending=*/true));
    const at::Tensor by_row = std::get<1>(at::sort(pair_rows.index_select(0, by_score), /*stable=*/true, 0, false));
    const at::Tensor order = by_score.index_select(0, by_row);
    const at::Tensor starts = counts.cumsum(0).sub(counts);
    const at::Tensor take = order.index_select(
        0, starts.unsqueeze(1).add(at::arange(k, starts.options()).unsqueeze(0)).view({-1}));
    out_score.index_copy_(0, ids, det.index_select(0, take).view({m, k}));
    out_index.index_copy_(0, ids, cols.index_select(0, take).view({m, k}));
  }
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cuda(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                    int64_t k, bool exclude_self, c10::string_view precision_arg) {
  constexpr const char* op = "cosine_topk";
  const RetrievalSizes sizes = retrieval_prologue(op, query_in, gallery_in, exclude_self);
  check_topk_k(op, k, sizes.ranked, exclude_self);
  const Precision precision = topk::parse_precision(op, precision_arg);
  // The guard makes query's device current for every allocation and launch below.
  const c10::cuda::CUDAGuard guard(query_in.device());
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  const int64_t nq = sizes.nq, ng = sizes.ng, d = sizes.d;
  const at::ScalarType dtype = query.scalar_type();
  const bool wide = dtype == at::kDouble;
  Operands o;
  o.precision = precision;
  o.score_dtype = wide && precision == Precision::Exact ? at::kDouble : at::kFloat;
  const at::ScalarType rescore_dtype = wide ? at::kDouble : at::kFloat;
  o.q_r = query.to(rescore_dtype).contiguous();
  o.g_r = gallery.to(rescore_dtype).contiguous();
  const at::ScalarType low_dtype = precision == Precision::BF16 ? at::kBFloat16 : o.score_dtype;
  o.q_low = o.q_r.to(low_dtype);
  o.g_low = o.g_r.to(low_dtype);
  o.margin = topk::candidate_margin(precision, input_kind(dtype), d).margin;

  const cuda::DeviceLimits limits = cuda::device_limits();
  const int64_t score_bytes = at::elementSize(o.score_dtype);
  int64_t workspace = topk::default_workspace_elements(limits.free_bytes, score_bytes);
  // Tests shrink the workspace to take the several-tiles and several-blocks paths on small inputs.
  if (const char* env = std::getenv("SDML_CUDA_TOPK_WORKSPACE")) workspace = std::max<int64_t>(1, std::atoll(env));
  const Plan plan = topk::plan_topk(nq, ng, k, score_bytes, workspace, limits.sm_count, limits.smem_optin,
                                    precision != Precision::Exact);

  const auto options = query.options();
  at::Tensor out_score = at::empty({nq, k}, options.dtype(at::kDouble));
  at::Tensor out_index = at::empty({nq, k}, options.dtype(at::kLong));
  at::Tensor overflow = at::zeros({nq}, options.dtype(at::kInt));
  if (plan.fallback) {
    topk_fallback(o, at::arange(nq, options.dtype(at::kLong)), k, exclude_self, workspace, out_score, out_index);
    return {out_score.to(dtype), out_index};
  }
  const int64_t lists = plan.segments + 1;  // the segments' lists and the running list
  at::Tensor ws = at::empty({plan.tile_rows, plan.ld}, options.dtype(o.score_dtype));
  at::Tensor list_score = at::empty({plan.tile_rows, lists, plan.cap}, options.dtype(o.score_dtype));
  at::Tensor list_index = at::empty({plan.tile_rows, lists, plan.cap}, options.dtype(at::kInt));
  at::Tensor list_count = at::empty({plan.tile_rows, lists}, options.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(o.score_dtype, "cosine_topk_select", [&] {
    using S = scalar_t;
    auto select = select_segments_kernel<S>;
    cuda::allow_dynamic_smem(select, plan.select_smem);
    AT_DISPATCH_FLOATING_TYPES(rescore_dtype, "cosine_topk_merge", [&] {
      using T = scalar_t;
      auto merge = merge_lists_kernel<S, T>;
      cuda::allow_dynamic_smem(merge, plan.merge_smem);
      for (int64_t q0 = 0; q0 < nq; q0 += plan.tile_rows) {
        const int64_t n = std::min(plan.tile_rows, nq - q0);
        list_count.select(1, lists - 1).fill_(0);
        const at::Tensor q_tile = o.q_low.narrow(0, q0, n);
        for (int64_t g0 = 0; g0 < ng; g0 += plan.block_cols) {
          const int64_t cols = std::min(plan.block_cols, ng - g0);
          at::Tensor scores = ws.narrow(0, 0, n).narrow(1, 0, cols);
          low_gemm(scores, q_tile, o.g_low.narrow(0, g0, cols), precision);
          select<<<n * plan.segments, kThreads, plan.select_smem, stream>>>(
              ws.const_data_ptr<S>(), plan.ld, cols, plan.segment_cols, int(plan.segments), q0, g0, exclude_self,
              int(k), static_cast<S>(o.margin), int(plan.buffer), int(plan.cap), list_score.mutable_data_ptr<S>(),
              list_index.mutable_data_ptr<int32_t>(), list_count.mutable_data_ptr<int32_t>(), int(lists),
              overflow.mutable_data_ptr<int32_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const bool finish = g0 + plan.block_cols >= ng;
          merge<<<n, kThreads, plan.merge_smem, stream>>>(
              list_score.mutable_data_ptr<S>(), list_index.mutable_data_ptr<int32_t>(),
              list_count.mutable_data_ptr<int32_t>(), int(lists), int(plan.cap), q0, int(k), static_cast<S>(o.margin),
              int(plan.buffer), overflow.mutable_data_ptr<int32_t>(), finish, o.q_r.const_data_ptr<T>(),
              o.g_r.const_data_ptr<T>(), d, out_score.mutable_data_ptr<double>(), out_index.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  const at::Tensor redo = at::nonzero(overflow).view({-1});
  if (redo.size(0) > 0) topk_fallback(o, redo, k, exclude_self, workspace, out_score, out_index);
  return {out_score.to(dtype), out_index};
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CUDA, m) { m.impl("cosine_topk", &cosine_topk_cuda); }

}  // namespace sdml
