// CPU kernel of the fused SDML loss: rows in parallel (at::parallel_for), each row one pass over
// x_hat and x with vectorized accumulation. P^T h is formed for a tile of rows at a time by a
// GEMM into a small per-thread buffer (GEMM rate; the [B, c] product is never materialized).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sdml/cpu_blas.h"
#include "sdml/dsae_loss.h"
#include "sdml/dsae_loss_math.h"
#include "sdml/host_buffers.h"

namespace sdml {
namespace {

using namespace dsae;

// Elements per parallel task: enough work to amortize scheduling, small enough that B = 100
// still splits across both cores.
constexpr int64_t kGrainElements = 16384;

// sum_i (a_i - b_i)^2
template <typename T, typename A>
SDML_CPU_CLONES A row_sq_dist(const T* a, const T* b, int64_t n) {
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += sq(A(a[i]) - A(b[i]));
  return acc;
}

// out_i = coef * (a_i - b_i)
template <typename T, typename A>
SDML_CPU_CLONES void row_scaled_diff(const T* a, const T* b, T* out, A coef, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = T(coef * (A(a[i]) - A(b[i])));
}

template <typename T>
bool row_labelled(const T* y, int64_t c) {
  for (int64_t i = 0; i < c; ++i)
    if (y[i] != T(0)) return true;
  return false;
}

// Rows whose projection residuals are formed by one GEMM: the buffer stays in cache.
constexpr int64_t kTileRows = 256;

// e = e - y in place for one row (e holds P^T h); returns ||e||^2.
template <typename T, typename A>
SDML_CPU_CLONES A subtract_labels(T* e, const T* y, int64_t c) {
  A norm2 = 0;
#pragma omp simd reduction(+ : norm2)
  for (int64_t col = 0; col < c; ++col) {
    e[col] = T(A(e[col]) - A(y[col]));
    norm2 += sq(A(e[col]));
  }
  return norm2;
}

// Residuals E[i] = P^T h_{row0+i} for n rows of h, into the first n rows of the tile buffer.
at::Tensor project_tile(const at::Tensor& h, const at::Tensor& P, at::Tensor& tile, int64_t row0, int64_t n) {
  at::Tensor E = tile.narrow(0, 0, n);
  at::mm_out(E, h.narrow(0, row0, n), P);
  return E;
}

int64_t grain_rows(int64_t per_row) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_row, 1)); }

DsaeForward dsae_loss_cpu(const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& h_in,
                          const at::Tensor& P_in, const at::Tensor& y_in, double lam, bool check_finite) {
  check_dsae_loss_args(x_hat_in, x_in, h_in, P_in, y_in, lam);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tile GEMMs are internal
  const at::Tensor x_hat = rows_contiguous(x_hat_in), x = rows_contiguous(x_in), h = h_in,
                   y = rows_contiguous(y_in), P = P_in;
  const int64_t B = x_hat.size(0), D = x_hat.size(1), d = h.size(1), c = P.size(1);
  TORCH_CHECK_TYPE(x_hat.scalar_type() == at::kFloat || x_hat.scalar_type() == at::kDouble,
                   "dsae_loss: on CPU x_hat must be float32 or float64, got ", x_hat.scalar_type());
  const auto acc_dtype = x_hat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_rec = at::empty({B}, x_hat.options().dtype(acc_dtype));
  at::Tensor row_sup = at::empty({B}, x_hat.options().dtype(acc_dtype));
  at::Tensor loss = at::empty({}, x_hat.options()), rec = at::empty({}, x_hat.options()),
             sup = at::empty({}, x_hat.options());
  at::Tensor n_labelled = at::empty({}, x_hat.options().dtype(at::kLong));
  std::vector<uint8_t> labelled(B);

  AT_DISPATCH_FLOATING_TYPES(x_hat.scalar_type(), "dsae_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *xh_p = x_hat.const_data_ptr<scalar_t>(), *x_p = x.const_data_ptr<scalar_t>(),
                   *y_p = y.const_data_ptr<scalar_t>();
    const int64_t sxh = x_hat.stride(0), sx = x.stride(0), sy = y.stride(0);
    A *rr = row_rec.mutable_data_ptr<A>(), *rs = row_sup.mutable_data_ptr<A>();
    at::parallel_for(0, B, grain_rows(D + d * c), [&](int64_t begin, int64_t end) {
      const SingleThreadedBlas one_thread;
      at::Tensor tile = at::empty({std::min(kTileRows, end - begin), c}, h.options());
      for (int64_t row0 = begin; row0 < end; row0 += kTileRows) {
        const int64_t n = std::min(kTileRows, end - row0);
        scalar_t* e = project_tile(h, P, tile, row0, n).mutable_data_ptr<scalar_t>();
        for (int64_t j = row0; j < row0 + n; ++j, e += c) {
          rr[j] = std::sqrt(row_sq_dist<scalar_t, A>(xh_p + j * sxh, x_p + j * sx, D));
          labelled[j] = row_labelled(y_p + j * sy, c);
          rs[j] = labelled[j] ? std::sqrt(subtract_labels<scalar_t, A>(e, y_p + j * sy, c)) : A(0);
        }
      }
    });
    // Serial, in row order, in double: deterministic and accurate for any thread count.
    double sum_rec = 0, sum_sup = 0;
    int64_t n_lab = 0;
    for (int64_t j = 0; j < B; ++j) {
      sum_rec += rr[j];
      sum_sup += rs[j];
      n_lab += labelled[j];
    }
    const Terms<double> t = combine(sum_rec, sum_sup, B, n_lab, lam);
    *loss.mutable_data_ptr<scalar_t>() = scalar_t(t.loss);
    *rec.mutable_data_ptr<scalar_t>() = scalar_t(t.rec);
    *sup.mutable_data_ptr<scalar_t>() = scalar_t(t.sup);
    *n_labelled.mutable_data_ptr<int64_t>() = n_lab;
  });
  if (check_finite) check_dsae_loss_finite(rec, sup, x_hat_in, x_in, h_in, P_in, y_in);
  return {loss, rec, sup, row_rec, row_sup, n_labelled};
}

double scalar_or_zero(const std::optional<at::Tensor>& g) { return g.has_value() ? g->item<double>() : 0.0; }

DsaeBackward dsae_loss_backward_cpu(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_rec,
    const std::optional<at::Tensor>& grad_sup, const std::optional<at::Tensor>& grad_row_rec,
    const std::optional<at::Tensor>& grad_row_sup, const at::Tensor& x_hat_in, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& P_in, const at::Tensor& y_in, const at::Tensor& row_rec,
    const at::Tensor& row_sup, const at::Tensor& n_labelled, double lam, bool need_input_grad,
    bool need_code_grad) {
  check_dsae_loss_args(x_hat_in, x_in, h_in, P_in, y_in, lam);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tile GEMMs are internal
  const at::Tensor x_hat = rows_contiguous(x_hat_in), x = rows_contiguous(x_in), h = h_in,
                   y = rows_contiguous(y_in), P = P_in;
  const int64_t B = x_hat.size(0), D = x_hat.size(1), d = h.size(1), c = P.size(1);
  const auto acc_dtype = row_rec.scalar_type();
  const at::Tensor g_row_rec = grad_row_rec.has_value() ? grad_row_rec->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor g_row_sup = grad_row_sup.has_value() ? grad_row_sup->to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor grad_x_hat = empty_large_cpu({need_input_grad ? B : 0, D}, x_hat.options());
  at::Tensor grad_h = empty_large_cpu({need_code_grad ? B : 0, d}, h.options());
  const double g_loss = scalar_or_zero(grad_loss), g_rec = scalar_or_zero(grad_rec),
               g_sup = scalar_or_zero(grad_sup);
  const int64_t n_lab = n_labelled.item<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(x_hat.scalar_type(), "dsae_loss_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *xh_p = x_hat.const_data_ptr<scalar_t>(), *x_p = x.const_data_ptr<scalar_t>(),
                   *y_p = y.const_data_ptr<scalar_t>();
    const int64_t sxh = x_hat.stride(0), sx = x.stride(0), sy = y.stride(0);
    const A *rr = row_rec.const_data_ptr<A>(), *rs = row_sup.const_data_ptr<A>();
    const A *grr = g_row_rec.defined() ? g_row_rec.const_data_ptr<A>() : nullptr;
    const A *grs = g_row_sup.defined() ? g_row_sup.const_data_ptr<A>() : nullptr;
    const A w_rec = rec_weight<A>(g_loss, g_rec, lam, B), w_sup = sup_weight<A>(g_loss, g_sup, lam, n_lab);
    scalar_t* gxh = need_input_grad ? grad_x_hat.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t per_row = (need_input_grad ? D : 0) + (need_code_grad ? 2 * d * c : 0);
    at::parallel_for(0, B, grain_rows(per_row), [&](int64_t begin, int64_t end) {
      if (gxh) {
        for (int64_t j = begin; j < end; ++j) {
          const A alpha = w_rec + (grr ? grr[j] : A(0));
          row_scaled_diff<scalar_t, A>(xh_p + j * sxh, x_p + j * sx, gxh + j * D,
                                       alpha * inv_norm_or_zero(rr[j]), D);
        }
      }
      if (!need_code_grad) return;
      const SingleThreadedBlas one_thread;
      // grad_h rows = (beta_j / s_j) e_j P^T: scale the residual rows, then one GEMM per tile.
      at::Tensor tile = at::empty({std::min(kTileRows, end - begin), c}, h.options());
      for (int64_t row0 = begin; row0 < end; row0 += kTileRows) {
        const int64_t n = std::min(kTileRows, end - row0);
        at::Tensor E = project_tile(h, P, tile, row0, n);
        scalar_t* e = E.mutable_data_ptr<scalar_t>();
        for (int64_t j = row0; j < row0 + n; ++j, e += c) {
          if (!row_labelled(y_p + j * sy, c)) {
            std::fill_n(e, c, scalar_t(0));
            continue;
          }
          subtract_labels<scalar_t, A>(e, y_p + j * sy, c);
          const A coef = (w_sup + (grs ? grs[j] : A(0))) * inv_norm_or_zero(rs[j]);
          for (int64_t col = 0; col < c; ++col) e[col] = scalar_t(coef * A(e[col]));
        }
        at::Tensor out = grad_h.narrow(0, row0, n);
        at::mm_out(out, E, P.t());
      }
    });
  });
  return {grad_x_hat, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CPU, m) {
  m.impl("dsae_loss", &dsae_loss_cpu);
  m.impl("dsae_loss_backward", &dsae_loss_backward_cpu);
}

}  // namespace sdml
