// CPU kernels of the DSAE's autograd-free training step (sdml_ext/engine/explicit_step.py): the
// passes around the step's GEMMs, each fused into one sweep over its rows or columns, and Adam
// fused into the weight-gradient GEMM.
//
//  - dense_forward: out = act(input weight^T + bias) (ReLU or none), in fixed column tiles, each a
//    single-threaded GEMM followed by the bias and ReLU while the tile is in cache;
//  - dense_input_grad: the input's gradient grad_out weight (written or added), in column tiles;
//  - dense_bias_act: out = act(out + bias) after a GEMM made elsewhere (ReLU or none);
//  - normalize_rows / normalize_rows_backward: F.normalize(v, dim=1) and its exact derivative,
//    the backward optionally also summing its result's columns (the bias gradient under it);
//  - dense_grad: the ReLU mask applied to a gradient in place and its column sums (bias gradient);
//  - linear_weight_grad_adam: the weight gradient grad_out^T input, one fixed tile at a time (a
//    single-threaded GEMM into a buffer that stays in the core's cache), each tile consumed at
//    once by Adam: the gradient is never written to memory nor read back (two of the eight
//    passes over the weights' size that a GEMM then fused Adam make: its write, Adam's read);
//  - adam_update: Adam over contiguous buffers (the biases, laid end to end).
//
// No result depends on the thread count: rows are reduced one row per task in a fixed lane order,
// columns one column block per task in row order, tiles are fixed and each is one GEMM, and Adam
// is elementwise (its vector and scalar code are the same operations: this file is compiled
// with -ffp-contract=off, see sdml/adam_math.h). This file is compiled with -fopenmp (see
// CMakeLists.txt): at::parallel_for is OpenMP code inline in torch's headers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "sdml/adam_math.h"
#include "sdml/cpu_blas.h"
#include "sdml/dsae_loss_math.h"
#include "sdml/lane_sums.h"
#include "sdml/dsae_step.h"
#include "sdml/macros.h"

// The Fortran BLAS entry points torch's CPU GEMMs call (MKL or OpenBLAS inside libtorch_cpu).
// The weight-gradient tiles call them directly: at::mm_out's dispatch and views cost more than a
// small tile's arithmetic is worth. Weak: a torch without BLAS leaves them null, and the tiles
// then go through at::mm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace sdml {
namespace {

using dsae::acc_t;

// Elements per parallel task: enough to amortize scheduling, small enough that a [100, 1024]
// block still splits across the cores.
constexpr int64_t kGrainElements = 16384;
// Row reductions: sdml/lane_sums.h (the same bits for every vector width).
using lanes::kLanes;
using lanes::sum_lanes;
// Columns per task of a column reduction (a multiple of every vector width): each row's segment
// is 2 KiB (float) of contiguous memory, long enough for the hardware prefetcher; with 64 columns
// the pass was bound by a cache miss per row (rows are a page or more apart).
constexpr int64_t kColumnBlock = 512;
// The weight-gradient tiles: rows x columns of the weight. A [64, 1024] float tile (256 KiB),
// the input's column slice ([B, 1024]: 400 KiB at B = 100) and the gradient's ([B, 64]) stay in a
// core's L2 (2 MiB on current Xeons) while Adam streams the tile's weights and moments through it.
// Constants: tiles must not move with the thread count.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 1024;
// Columns per tile of the forward and input-gradient GEMMs ([B, n] outputs; B is the batch, ~100):
// each tile is one single-threaded BLAS call. Why tiles and not one threaded at::mm: at B ~ 100 a
// threaded BLAS splits the small dimension poorly (measured on an AMD Zen 3 with MKL: 94-133
// GFLOP/s for the step's six layer shapes on 2 threads against 76-87 a thread alone, i.e. 1.2-1.6x
// short of the cores' sum), while fixed column tiles keep every core on a full-width product;
// and the result is then the same for every thread count. 128 columns: a 1,024-wide layer still
// gives 8 tiles (balanced on 2-8 threads), and the tile's output block ([B, 128]) stays in L2
// for the bias and ReLU pass that follows it.
constexpr int64_t kDenseCols = 128;

// Row-major C [m, n] = alpha-free op(A) op(B) + beta C (op: transpose or not; leading dimensions
// in elements), as one BLAS call on the calling thread's BLAS threads. Column-major BLAS sees
// the transposes: C^T = op(B)^T op(A)^T. Without BLAS symbols (a torch built without BLAS), the
// same product through at::mm_out / at::addmm_out on strided views.
template <typename T>
void row_major_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&tb, &ta, &ni, &mi, &ki, &one, b, &lb, a, &la, &beta, c, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&tb, &ta, &ni, &mi, &ki, &one, b, &lb, a, &la, &beta, c, &lc);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) [rows, cols]: X itself is [cols, rows] (leading dimension ld) when transposed.
    return trans ? at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, opts)
                 : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(out, view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb));
  } else {
    at::addmm_out(out, out, view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb));
  }
}

// tile [rows, cols] (row-major, contiguous) = g[:, r0 : r0 + rows]^T x[:, c0 : c0 + cols] for row
// blocks g [B, n_out] and x [B, n_in].
template <typename T>
void tile_gemm(const T* g, const T* x, int64_t B, int64_t n_out, int64_t n_in, int64_t r0, int64_t rows, int64_t c0,
               int64_t cols, T* tile) {
  row_major_gemm<T>(true, false, rows, cols, B, g + r0, n_out, x + c0, n_in, T(0), tile, cols);
}

// Elements per Adam task unit: a multiple of every vector width (the split is elementwise anyway).
constexpr int64_t kAdamUnit = 64;

int64_t grain_rows(int64_t per_row) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_row, 1)); }


// sum_i a_i b_i, in kLanes lanes.
template <typename T, typename A>
SDML_CPU_CLONES A row_dot(const T* a, const T* b, int64_t n) {
  A lane[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += A(a[i + l]) * A(b[i + l]);
  }
  for (int64_t i = full; i < n; ++i) lane[i - full] += A(a[i]) * A(b[i]);
  return sum_lanes(lane);
}

// ReLU as torch computes it for the forward (NaN passes) and its mask for the backward
// (threshold_backward: the gradient is dropped where the output is <= 0).
template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}
template <typename T>
inline T relu_grad(T g, T out) {
  return out <= T(0) ? T(0) : g;
}

// ---- forward ------------------------------------------------------------------------------

template <typename T>
SDML_CPU_CLONES void bias_act_row(T* out, const T* bias, int64_t n, bool apply_relu) {
  if (apply_relu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = relu(out[i] + bias[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = out[i] + bias[i];
  }
}

void dense_bias_act_cpu(const at::Tensor& out, const at::Tensor& bias, bool apply_relu) {
  check_dense_bias_act_args(out, bias);
  const int64_t B = out.size(0), n = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "dense_bias_act_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(n), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) bias_act_row<scalar_t>(o + j * n, b, n, apply_relu);
    });
  });
}

// out [B, n_out] = act(input [B, n_in] weight [n_out, n_in]^T + bias): kDenseCols output columns
// per task, each one single-threaded GEMM into out's columns, then bias and ReLU over the tile
// while it is in cache (the same elementwise arithmetic as dense_bias_act).
void dense_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, bool apply_relu,
                       const at::Tensor& out) {
  check_dense_forward_args(input, weight, bias, out);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the fallback GEMM's views
  const int64_t B = input.size(0), n_in = input.size(1), n_out = weight.size(0);
  const int64_t tiles = (n_out + kDenseCols - 1) / kDenseCols;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "dense_forward_cpu", [&] {
    const scalar_t *x = input.const_data_ptr<scalar_t>(), *w = weight.const_data_ptr<scalar_t>(),
                   *b = bias.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below;  // not inherited by OpenMP threads
      const SingleThreadedBlas one_thread;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c0 = t * kDenseCols, cols = std::min(kDenseCols, n_out - c0);
        row_major_gemm<scalar_t>(false, true, B, cols, n_in, x, n_in, w + c0 * n_in, n_in, scalar_t(0), o + c0, n_out);
        for (int64_t j = 0; j < B; ++j) bias_act_row<scalar_t>(o + j * n_out + c0, b + c0, cols, apply_relu);
      }
    });
  });
}

template <typename T, typename A>
SDML_CPU_CLONES void divide_row(const T* v, T* out, A denom, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = T(A(v[i]) / denom);
}

// out = v / max(||v||, eps) row by row; norm = ||v|| (not clamped: the backward needs to know
// whether the clamp was active).
void normalize_rows_cpu(const at::Tensor& v, double eps, const at::Tensor& out, const at::Tensor& norm) {
  check_normalize_rows_args(v, eps, out, norm);
  const int64_t B = v.size(0), n = v.size(1);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "normalize_rows_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t *op = out.mutable_data_ptr<scalar_t>(), *np = norm.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(2 * n), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const scalar_t* row = vp + j * n;
        const A length = std::sqrt(row_dot<scalar_t, A>(row, row, n));
        np[j] = scalar_t(length);
        divide_row<scalar_t, A>(row, op + j * n, std::max(A(np[j]), A(eps)), n);
      }
    });
  });
}

// ---- backward -----------------------------------------------------------------------------

// grad_input = (g - c u) / denom for one row, c = u . g where the norm reached eps, else 0.
template <typename T, typename A>
SDML_CPU_CLONES void normalize_grad_row(const T* g, const T* u, T* gi, A c, A denom, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gi[i] = T((A(g[i]) - c * A(u[i])) / denom);
}

// The same for columns [c0, c0 + w) of every row, adding them into sums[0 .. w).
template <typename T, typename A>
SDML_CPU_CLONES void normalize_grad_columns(const T* g, const T* u, T* gi, const A* c, const A* denom, int64_t B,
                                            int64_t n, int64_t c0, int64_t w, A* sums) {
  for (int64_t j = 0; j < B; ++j) {
    const int64_t at = j * n + c0;
    const A cj = c[j], dj = denom[j];
#pragma omp simd
    for (int64_t i = 0; i < w; ++i) {
      const T value = T((A(g[at + i]) - cj * A(u[at + i])) / dj);
      gi[at + i] = value;
      sums[i] += A(value);
    }
  }
}

// d v of out = F.normalize(v): with u = out, r = ||v|| and denom = max(r, eps),
// dv = (g - u (u . g)) / denom where r >= eps; dv = g / eps where r < eps (the clamp passes no
// gradient to the norm there). Optionally the column sums of dv.
void normalize_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& norm, double eps,
                                 const at::Tensor& grad_input, const std::optional<at::Tensor>& column_sums) {
  check_normalize_rows_backward_args(grad, out, norm, eps, grad_input, column_sums);
  const int64_t B = grad.size(0), n = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "normalize_rows_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *g = grad.const_data_ptr<scalar_t>(), *u = out.const_data_ptr<scalar_t>(),
                   *r = norm.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    std::vector<A> coef(B), denom(B);
    const auto row_terms = [&](int64_t j) {
      const bool passes = A(r[j]) >= A(eps);
      coef[j] = passes ? row_dot<scalar_t, A>(u + j * n, g + j * n, n) : A(0);
      denom[j] = std::max(A(r[j]), A(eps));
    };
    if (!column_sums.has_value()) {
      at::parallel_for(0, B, grain_rows(3 * n), [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          row_terms(j);
          normalize_grad_row<scalar_t, A>(g + j * n, u + j * n, gi + j * n, coef[j], denom[j], n);
        }
      });
      return;
    }
    at::parallel_for(0, B, grain_rows(2 * n), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) row_terms(j);
    });
    scalar_t* sums_out = column_sums->mutable_data_ptr<scalar_t>();
    const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
    at::parallel_for(0, blocks, grain_rows(B * kColumnBlock), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * kColumnBlock, w = std::min(kColumnBlock, n - c0);
        A sums[kColumnBlock] = {};
        normalize_grad_columns<scalar_t, A>(g, u, gi, coef.data(), denom.data(), B, n, c0, w, sums);
        for (int64_t i = 0; i < w; ++i) sums_out[c0 + i] = scalar_t(sums[i]);
      }
    });
  });
}

// grad_input [B, n_in] (+)= grad_out [B, n_out] weight [n_out, n_in]: kDenseCols input columns
// per task, each one single-threaded GEMM (beta 1 when accumulating: the decoder's first layer
// adds its share into the code's gradient in place).
void dense_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& grad_input,
                          bool accumulate) {
  check_dense_input_grad_args(grad_out, weight, grad_input);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = grad_out.size(0), n_out = grad_out.size(1), n_in = weight.size(1);
  const int64_t tiles = (n_in + kDenseCols - 1) / kDenseCols;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "dense_input_grad_cpu", [&] {
    const scalar_t *g = grad_out.const_data_ptr<scalar_t>(), *w = weight.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    const scalar_t beta = accumulate ? scalar_t(1) : scalar_t(0);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below;
      const SingleThreadedBlas one_thread;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c0 = t * kDenseCols, cols = std::min(kDenseCols, n_in - c0);
        row_major_gemm<scalar_t>(false, false, B, cols, n_out, g, n_out, w + c0, n_in, beta, gi + c0, n_in);
      }
    });
  });
}

// Columns [c0, c0 + w) of every row: the ReLU mask applied in place (when `act` is given), the
// masked gradient added into sums[0 .. w), rows in order.
template <typename T, typename A>
SDML_CPU_CLONES void mask_and_sum_columns(T* g, const T* act, int64_t B, int64_t n, int64_t c0, int64_t w, A* sums) {
  for (int64_t j = 0; j < B; ++j) {
    T* row = g + j * n + c0;
    if (act != nullptr) {
      const T* a = act + j * n + c0;
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) {
        row[i] = relu_grad(row[i], a[i]);
        sums[i] += A(row[i]);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) sums[i] += A(row[i]);
    }
  }
}

// The gradient of a dense layer's pre-activation from that of its output: grad *= (act > 0) in
// place (threshold_backward's rule) when the layer has a ReLU (act = its output); grad_bias = the
// column sums.
void dense_grad_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& activation, const at::Tensor& grad_bias) {
  check_dense_grad_args(grad, activation, grad_bias);
  const int64_t B = grad.size(0), n = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dense_grad_cpu", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* act = activation.has_value() ? activation->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
    at::parallel_for(0, blocks, grain_rows(B * kColumnBlock), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * kColumnBlock, w = std::min(kColumnBlock, n - c0);
        A sums[kColumnBlock] = {};
        mask_and_sum_columns<scalar_t, A>(g, act, B, n, c0, w, sums);
        for (int64_t i = 0; i < w; ++i) gb[c0 + i] = scalar_t(sums[i]);
      }
    });
  });
}

// ---- Adam ---------------------------------------------------------------------------------

template <typename T>
SDML_CPU_CLONES void adam_segment(const adam::Step<T>& step, const T* g, T* p, T* m, T* v, int64_t n) {
  const adam::Step<T> s = step;  // a local copy: the stores below cannot change it
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) adam::update(s, g[i], p[i], m[i], v[i]);
}

void adam_update_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps, double step) {
  check_adam_update_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step);
  const int64_t n = param.numel();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_update_cpu", [&] {
    const auto s = adam::make_step<scalar_t>(lr, beta1, beta2, eps, step);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t *p = param.mutable_data_ptr<scalar_t>(), *m = exp_avg.mutable_data_ptr<scalar_t>(),
             *v = exp_avg_sq.mutable_data_ptr<scalar_t>();
    const int64_t units = (n + kAdamUnit - 1) / kAdamUnit;
    at::parallel_for(0, units, std::max<int64_t>(1, kGrainElements / kAdamUnit), [&](int64_t begin, int64_t end) {
      const int64_t lo = begin * kAdamUnit, hi = std::min(end * kAdamUnit, n);
      adam_segment<scalar_t>(s, g + lo, p + lo, m + lo, v + lo, hi - lo);
    });
  });
}

// weight -= Adam(grad_out^T input), tile by tile: tile t covers weight rows [r0, r0 + 64) and
// columns [c0, c0 + 1024); tiles that share a column slice of the input are consecutive, so a
// task's tiles reuse it from cache. Each tile is one single-threaded GEMM into the task's buffer,
// then Adam over the tile's rows (and a copy into grad_weight when given).
void linear_weight_grad_adam_cpu(const at::Tensor& grad_out_in, const at::Tensor& input_in, const at::Tensor& weight,
                                 const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double lr, double beta1,
                                 double beta2, double eps, double step, const std::optional<at::Tensor>& grad_weight) {
  check_linear_weight_grad_adam_args(grad_out_in, input_in, weight, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step,
                                     grad_weight);
  // Detached: the tile GEMMs run on OpenMP threads, outside the caller's dispatch guard.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad_out = grad_out_in.detach(), input = input_in.detach();
  const int64_t n_out = weight.size(0), n_in = weight.size(1);
  const int64_t row_tiles = (n_out + kTileRows - 1) / kTileRows, col_tiles = (n_in + kTileCols - 1) / kTileCols;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "linear_weight_grad_adam_cpu", [&] {
    const auto s = adam::make_step<scalar_t>(lr, beta1, beta2, eps, step);
    scalar_t *p = weight.mutable_data_ptr<scalar_t>(), *m = exp_avg.mutable_data_ptr<scalar_t>(),
             *v = exp_avg_sq.mutable_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.has_value() ? grad_weight->mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t *go = grad_out.const_data_ptr<scalar_t>(), *x = input.const_data_ptr<scalar_t>();
    const int64_t B = grad_out.size(0);
    at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below;  // not inherited by OpenMP threads
      const SingleThreadedBlas one_thread;
      std::vector<scalar_t> buffer(std::min(kTileRows, n_out) * std::min(kTileCols, n_in));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = (t % row_tiles) * kTileRows, c0 = (t / row_tiles) * kTileCols;
        const int64_t rows = std::min(kTileRows, n_out - r0), cols = std::min(kTileCols, n_in - c0);
        tile_gemm<scalar_t>(go, x, B, n_out, n_in, r0, rows, c0, cols, buffer.data());
        const scalar_t* g = buffer.data();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t at = (r0 + i) * n_in + c0;
          if (gw != nullptr) std::copy_n(g + i * cols, cols, gw + at);
          adam_segment<scalar_t>(s, g + i * cols, p + at, m + at, v + at, cols);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CPU, m) {
  m.impl("dense_bias_act", &dense_bias_act_cpu);
  m.impl("dense_forward", &dense_forward_cpu);
  m.impl("dense_input_grad", &dense_input_grad_cpu);
  m.impl("normalize_rows", &normalize_rows_cpu);
  m.impl("normalize_rows_backward", &normalize_rows_backward_cpu);
  m.impl("dense_grad", &dense_grad_cpu);
  m.impl("adam_update", &adam_update_cpu);
  m.impl("linear_weight_grad_adam", &linear_weight_grad_adam_cpu);
}

}  // namespace sdml
