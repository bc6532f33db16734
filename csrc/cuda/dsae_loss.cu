// CUDA kernels of the fused SDML loss, launched on the current stream: a (rows x splits) grid so
// that small batches fill the device, 16-byte loads, one read of x_hat and x forward and one
// backward (plan and layout: sdml/dsae_loss.h). The per-row math is sdml/dsae_loss_math.h,
// shared with the CPU kernel.
//
// When the forward is asked for the gradients at unit upstream gradient (need_input_grad /
// need_code_grad), it runs the backward kernel right after its own, with grad_loss a device 1
// (no host sync, so CUDA-graph capturable): the op contract of the CPU kernel, whose forward forms
// them in the same pass.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>

#include <cstdint>
#include <initializer_list>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sdml/dsae_loss.h"
#include "sdml/dsae_loss_math.h"

namespace sdml {
namespace {

using namespace dsae;

constexpr int kThreads = kDsaeCudaThreads;
constexpr int kWarps = kThreads / 32;

// Sum of v over the block, valid in thread 0. Deterministic: fixed shuffle tree.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  __syncthreads();  // scratch may still be read by a previous call
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : A(0);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// Whether row y (c entries) has a non-zero label; the same answer in every thread.
template <typename T, typename A>
__device__ bool block_row_labelled(const T* y, int64_t c) {
  int any = 0;
  for (int64_t col = threadIdx.x; col < c; col += blockDim.x) any |= static_cast<A>(y[col]) != A(0);
  return __syncthreads_or(any);
}

// e = P^T h - y for one row (Pt = P^T, [c, d] row-major, so that a column of P is contiguous):
// a warp per column, lanes over k, h read through the L1 cache (no shared memory that grows with
// d or c). e goes to e_out[col] when given (global scratch, read back by the same block after a
// barrier). Returns this thread's part of ||e||^2 (non-zero on lane 0 of each warp).
template <typename T, typename A>
__device__ A block_project_residual(const T* __restrict__ Pt, const T* __restrict__ h, const T* __restrict__ y,
                                    int64_t d, int64_t c, A* e_out) {
  const int lane = threadIdx.x & 31;
  A part = 0;
  for (int64_t col = threadIdx.x >> 5; col < c; col += kWarps) {
    const T* Pt_c = Pt + col * d;
    A dot = 0;
    for (int64_t k = lane; k < d; k += 32) dot += static_cast<A>(Pt_c[k]) * static_cast<A>(h[k]);
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_down_sync(0xffffffffu, dot, off);
    if (lane == 0) {
      const A e = dot - static_cast<A>(y[col]);
      if (e_out) e_out[col] = e;
      part += sq(e);
    }
  }
  return part;
}

// 16 bytes of T: N elements.
template <typename T>
struct Pack {
  static constexpr int N = 16 / sizeof(T);
  alignas(16) T v[N];
  __device__ __forceinline__ void load(const T* p) { *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v); }
};

// Sum over columns [i0, i1) of a row of (x_hat - x)^2; 16-byte loads when vec (the caller checked
// the alignment of both rows and of i0), several in flight per thread.
template <typename T, typename A>
__device__ A slice_sq_diff(const T* __restrict__ xh, const T* __restrict__ x, int64_t i0, int64_t i1, bool vec) {
  A part = 0;
  if (vec) {
    constexpr int N = Pack<T>::N;
    const int64_t full = i0 + (i1 - i0) / N * N;
#pragma unroll 4  // several 16-byte loads in flight per thread
    for (int64_t i = i0 + int64_t(threadIdx.x) * N; i < full; i += int64_t(blockDim.x) * N) {
      Pack<T> a, b;
      a.load(xh + i);
      b.load(x + i);
#pragma unroll
      for (int t = 0; t < N; ++t) part += sq(static_cast<A>(a.v[t]) - static_cast<A>(b.v[t]));
    }
    i0 = full;
  }
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) part += sq(static_cast<A>(xh[i]) - static_cast<A>(x[i]));
  return part;
}

// Block (j, s): the reconstruction partial of row j over its slice -> part_rec[j, s]; block
// (j, 0) also the projection residual norm -> row_sup[j] and the label flag -> labelled[j].
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) dsae_forward_kernel(
    const T* __restrict__ xh, const T* __restrict__ x, const T* __restrict__ h, const T* __restrict__ Pt,
    const T* __restrict__ y, int64_t sxh, int64_t sx, int64_t sh, int64_t sy, int64_t D, int64_t d, int64_t c,
    int64_t slice, bool vec, A* __restrict__ part_rec, A* __restrict__ row_sup, int32_t* __restrict__ labelled) {
  __shared__ A scratch[kWarps];
  const int64_t j = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int64_t i0 = s * slice, i1 = i0 + slice < D ? i0 + slice : D;
  const A r2 = block_sum(slice_sq_diff<T, A>(xh + j * sxh, x + j * sx, i0, i1, vec), scratch);
  if (threadIdx.x == 0) part_rec[j * splits + s] = r2;
  if (s != 0) return;  // uniform per block
  const bool has_label = block_row_labelled<T, A>(y + j * sy, c);
  A s2 = 0;
  if (has_label) s2 = block_sum(block_project_residual<T, A>(Pt, h + j * sh, y + j * sy, d, c, (A*)nullptr), scratch);
  if (threadIdx.x == 0) {
    row_sup[j] = has_label ? sqrt(s2) : A(0);
    labelled[j] = has_label;
  }
}

// One block: row_rec[j] = sqrt(sum_s part_rec[j, s]) (fixed order), n_labelled, the three terms.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) dsae_finalize_kernel(
    const A* __restrict__ part_rec, int64_t splits, const int32_t* __restrict__ labelled, int64_t B, A lam,
    A* __restrict__ row_rec, const A* __restrict__ row_sup, int64_t* __restrict__ n_labelled, T* loss, T* rec,
    T* sup) {
  __shared__ A scratch[kWarps];
  __shared__ long long count_scratch[kWarps];
  A a = 0, b = 0;
  long long n = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    A r2 = 0;
    for (int64_t t = 0; t < splits; ++t) r2 += part_rec[i * splits + t];
    const A r = sqrt(r2);
    row_rec[i] = r;
    a += r;
    b += row_sup[i];
    n += labelled[i];
  }
  a = block_sum(a, scratch);
  b = block_sum(b, scratch);
  n = block_sum(n, count_scratch);
  if (threadIdx.x == 0) {
    *n_labelled = n;
    const Terms<A> t = combine(a, b, B, n, lam);
    *loss = static_cast<T>(t.loss);
    *rec = static_cast<T>(t.rec);
    *sup = static_cast<T>(t.sup);
  }
}

// Upstream gradients, all on the device (no host sync); null = not used.
template <typename T, typename A>
struct Grads {
  const T *loss, *rec, *sup;
  const A *row_rec, *row_sup;
};

// Block (j, s): grad_x_hat of row j over its slice (one read of x_hat and x, 16-byte loads and
// stores when vec); block (j, 0) also grad_h of row j (e through the global scratch e_buf [B, c]).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) dsae_backward_kernel(
    const T* __restrict__ xh, const T* __restrict__ x, const T* __restrict__ h, const T* __restrict__ Pt,
    const T* __restrict__ y, int64_t sxh, int64_t sx, int64_t sh, int64_t sy, int64_t B, int64_t D, int64_t d,
    int64_t c, int64_t slice, bool vec, const A* __restrict__ row_rec, const A* __restrict__ row_sup,
    const int64_t* __restrict__ n_labelled, Grads<T, A> g, A lam, T* __restrict__ gxh, T* __restrict__ gh,
    A* e_buf) {
  const int64_t j = blockIdx.x, s = blockIdx.y;
  const A g_loss = g.loss ? static_cast<A>(*g.loss) : A(0);
  if (gxh) {
    const A g_rec = g.rec ? static_cast<A>(*g.rec) : A(0);
    const A alpha = rec_weight(g_loss, g_rec, lam, B) + (g.row_rec ? g.row_rec[j] : A(0));
    const A coef = alpha * inv_norm_or_zero(row_rec[j]);
    const T *xh_j = xh + j * sxh, *x_j = x + j * sx;
    T* out = gxh + j * D;
    int64_t i0 = s * slice;
    const int64_t i1 = i0 + slice < D ? i0 + slice : D;
    if (vec) {
      constexpr int N = Pack<T>::N;
      const int64_t full = i0 + (i1 - i0) / N * N;
#pragma unroll 4
      for (int64_t i = i0 + int64_t(threadIdx.x) * N; i < full; i += int64_t(blockDim.x) * N) {
        Pack<T> a, b, o;
        a.load(xh_j + i);
        b.load(x_j + i);
#pragma unroll
        for (int t = 0; t < N; ++t) o.v[t] = static_cast<T>(coef * (static_cast<A>(a.v[t]) - static_cast<A>(b.v[t])));
        o.store(out + i);
      }
      i0 = full;
    }
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
      out[i] = static_cast<T>(coef * (static_cast<A>(xh_j[i]) - static_cast<A>(x_j[i])));
  }
  if (!gh || s != 0) return;  // uniform per block
  const T* y_j = y + j * sy;
  T* out = gh + j * d;
  if (!block_row_labelled<T, A>(y_j, c)) {
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) out[k] = static_cast<T>(A(0));
    return;
  }
  A* e_j = e_buf + j * c;
  block_project_residual<T, A>(Pt, h + j * sh, y_j, d, c, e_j);
  __syncthreads();  // e_j (global) written by lane 0 of each warp is visible to the block
  const A g_sup = g.sup ? static_cast<A>(*g.sup) : A(0);
  const A beta = sup_weight(g_loss, g_sup, lam, *n_labelled) + (g.row_sup ? g.row_sup[j] : A(0));
  const A coef = beta * inv_norm_or_zero(row_sup[j]);
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    A acc = 0;
    for (int64_t col = 0; col < c; ++col) acc += static_cast<A>(Pt[col * d + k]) * e_j[col];
    out[k] = static_cast<T>(coef * acc);
  }
}

// Whether every row of each tensor starts 16-byte aligned (base and row stride), so that the
// kernels may use 16-byte loads (slices start at multiples of 8 elements: aligned too).
bool rows_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    const auto address = reinterpret_cast<uintptr_t>(t->const_data_ptr());
    if (address % 16 != 0 || (t->size(0) > 1 && (t->stride(0) * t->element_size()) % 16 != 0)) return false;
  }
  return true;
}

int64_t multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The views the kernels read: x_hat, x, h, y with unit-stride rows (copies only where they are
// not) and P^T contiguous ([c, d]: a column of P per row, read by one warp).
struct DeviceRows {
  at::Tensor x_hat, x, h, y, Pt;
  DeviceRows(const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& P_in,
             const at::Tensor& y_in)
      : x_hat(rows_contiguous(x_hat_in)), x(rows_contiguous(x_in)), h(rows_contiguous(h_in)),
        y(rows_contiguous(y_in)), Pt(P_in.t().contiguous()) {}
};

// Launches the backward kernel for the rows of r into grad_x_hat / grad_h (those asked for).
template <typename T, typename A>
void launch_backward(const DeviceRows& r, const DsaeSizes& s, const DsaeCudaPlan& plan, const at::Tensor& row_rec,
                     const at::Tensor& row_sup, const at::Tensor& n_labelled, const Grads<T, A>& g, double lam,
                     bool need_input_grad, bool need_code_grad, const at::Tensor& grad_x_hat, const at::Tensor& grad_h,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(need_input_grad ? plan.splits : 1));
  const at::Tensor e_buf = at::empty({need_code_grad ? s.B : 0, s.c}, row_rec.options());
  const bool vec = rows_aligned({&r.x_hat, &r.x}) && (!need_input_grad || rows_aligned({&grad_x_hat}));
  dsae_backward_kernel<T, A><<<grid, kThreads, 0, stream>>>(
      r.x_hat.const_data_ptr<T>(), r.x.const_data_ptr<T>(), r.h.const_data_ptr<T>(), r.Pt.const_data_ptr<T>(),
      r.y.const_data_ptr<T>(), r.x_hat.stride(0), r.x.stride(0), r.h.stride(0), r.y.stride(0), s.B, s.D, s.d, s.c,
      plan.slice, vec, row_rec.const_data_ptr<A>(), row_sup.const_data_ptr<A>(), n_labelled.const_data_ptr<int64_t>(),
      g, static_cast<A>(lam), need_input_grad ? grad_x_hat.mutable_data_ptr<T>() : nullptr,
      need_code_grad ? grad_h.mutable_data_ptr<T>() : nullptr, need_code_grad ? e_buf.mutable_data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

DsaeForward dsae_loss_cuda(const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& h_in,
                           const at::Tensor& P_in, const at::Tensor& y_in, double lam, bool check_finite,
                           bool need_input_grad, bool need_code_grad) {
  const DsaeSizes s = check_dsae_loss_args(x_hat_in, x_in, h_in, P_in, y_in, lam);
  const c10::cuda::CUDAGuard guard(x_hat_in.device());
  const DsaeCudaPlan plan = check_dsae_loss_cuda_limits(s, multiprocessors());
  const DeviceRows r(x_hat_in, x_in, h_in, P_in, y_in);
  const DsaeForward out = empty_dsae_forward(r.x_hat, s, need_input_grad, need_code_grad);
  const at::Tensor &loss = std::get<0>(out), &rec = std::get<1>(out), &sup = std::get<2>(out),
                   &row_rec = std::get<3>(out), &row_sup = std::get<4>(out), &n_labelled = std::get<5>(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor part_rec = at::empty({s.B, plan.splits}, row_rec.options());
  const at::Tensor labelled = at::empty({s.B}, row_rec.options().dtype(at::kInt));
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(plan.splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.x_hat.scalar_type(), "dsae_loss_cuda", [&] {
    using A = acc_t<scalar_t>;
    dsae_forward_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
        r.x_hat.const_data_ptr<scalar_t>(), r.x.const_data_ptr<scalar_t>(), r.h.const_data_ptr<scalar_t>(),
        r.Pt.const_data_ptr<scalar_t>(), r.y.const_data_ptr<scalar_t>(), r.x_hat.stride(0), r.x.stride(0),
        r.h.stride(0), r.y.stride(0), s.D, s.d, s.c, plan.slice, rows_aligned({&r.x_hat, &r.x}),
        part_rec.mutable_data_ptr<A>(), row_sup.mutable_data_ptr<A>(), labelled.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dsae_finalize_kernel<scalar_t, A><<<1, kThreads, 0, stream>>>(
        part_rec.const_data_ptr<A>(), plan.splits, labelled.const_data_ptr<int32_t>(), s.B, static_cast<A>(lam),
        row_rec.mutable_data_ptr<A>(), row_sup.const_data_ptr<A>(), n_labelled.mutable_data_ptr<int64_t>(),
        loss.mutable_data_ptr<scalar_t>(), rec.mutable_data_ptr<scalar_t>(), sup.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_input_grad || need_code_grad) {
      const at::Tensor one = at::ones({}, loss.options());  // grad_loss = 1, on the device
      const Grads<scalar_t, A> g{one.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, nullptr};
      launch_backward<scalar_t, A>(r, s, plan, row_rec, row_sup, n_labelled, g, lam, need_input_grad, need_code_grad,
                                   std::get<6>(out), std::get<7>(out), stream);
    }
  });
  if (check_finite) check_dsae_loss_finite(rec, sup, x_hat_in, x_in, h_in, P_in, y_in);
  return out;
}

// A device pointer to g (cast to dtype) or null; g stays alive in holder.
template <typename S>
const S* device_ptr(const std::optional<at::Tensor>& g, at::ScalarType dtype, at::Tensor& holder) {
  if (!g.has_value()) return nullptr;
  holder = g->to(dtype).contiguous();
  return holder.const_data_ptr<S>();
}

DsaeBackward dsae_loss_backward_cuda(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_rec,
    const std::optional<at::Tensor>& grad_sup, const std::optional<at::Tensor>& grad_row_rec,
    const std::optional<at::Tensor>& grad_row_sup, const at::Tensor& x_hat_in, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& P_in, const at::Tensor& y_in, const at::Tensor& row_rec,
    const at::Tensor& row_sup, const at::Tensor& n_labelled, double lam, bool need_input_grad,
    bool need_code_grad) {
  const DsaeSizes s = check_dsae_loss_backward_args(grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup,
                                                    x_hat_in, x_in, h_in, P_in, y_in, row_rec, row_sup,
                                                    n_labelled, lam);
  const c10::cuda::CUDAGuard guard(x_hat_in.device());
  const DsaeCudaPlan plan = check_dsae_loss_cuda_limits(s, multiprocessors());
  DsaeBackward grads = empty_dsae_backward(x_hat_in, s, need_input_grad, need_code_grad);
  if (!need_input_grad && !need_code_grad) return grads;
  const DeviceRows r(x_hat_in, x_in, h_in, P_in, y_in);
  const at::Tensor &grad_x_hat = std::get<0>(grads), &grad_h = std::get<1>(grads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = r.x_hat.scalar_type(), acc_dtype = row_rec.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dsae_loss_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    at::Tensor held[5];
    const Grads<scalar_t, A> g{device_ptr<scalar_t>(grad_loss, dtype, held[0]),
                               device_ptr<scalar_t>(grad_rec, dtype, held[1]),
                               device_ptr<scalar_t>(grad_sup, dtype, held[2]),
                               device_ptr<A>(grad_row_rec, acc_dtype, held[3]),
                               device_ptr<A>(grad_row_sup, acc_dtype, held[4])};
    launch_backward<scalar_t, A>(r, s, plan, row_rec, row_sup, n_labelled, g, lam, need_input_grad, need_code_grad,
                                 grad_x_hat, grad_h, stream);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CUDA, m) {
  m.impl("dsae_loss", &dsae_loss_cuda);
  m.impl("dsae_loss_backward", &dsae_loss_backward_cuda);
}

}  // namespace sdml
