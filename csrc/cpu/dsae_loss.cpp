// CPU kernel of the fused SDML loss, on every core (at::parallel_for; this file is compiled with
// -fopenmp, see CMakeLists.txt). Two kinds of parallel work, each split so that no result depends
// on how many threads run it:
//  - row work (||x_hat_j - x_j||, the gradient rows of x_hat): one row at a time, the row's
//    reduction in a fixed lane order (kLanes partial sums), so any split of the rows gives the
//    same bits;
//  - projection work (P^T h_j, and P e_j for the gradient of h): fixed tiles of kTileRows rows,
//    one single-threaded GEMM per tile into a per-thread buffer (the [B, c] product is never
//    materialized); tile boundaries do not move with the thread count, so neither do the GEMMs.
// The batch sums are taken afterwards, serially in row order in double.
//
// When asked (need_input_grad / need_code_grad), the forward also forms the gradients for an
// upstream gradient of 1 on the loss, while each row is in cache: the gradient row of x_hat right
// after the row's norm (a second read of a row that is still in L1/L2, not of memory), the tile's
// code-gradient GEMM right after its residuals. So the usual loss.backward() needs no second pass
// over x_hat and x (the backward hands these on, see sdml_ext/ops/dsae_loss.py). Both paths go
// through the same functions on the same values, so the forward's gradients are bitwise those of
// the backward kernel at grad_loss = 1.
//
// OpenMP's worker threads do not inherit the caller's thread-local dispatch state (the
// below-autograd guard of the entry point), so the tensors the tiles hand to ATen are detached
// first and each task sets the guard again.
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
#include "sdml/lane_sums.h"
#include "dsae_loss/gradient_rows.h"

namespace sdml {
namespace {

using namespace dsae;

// Elements per parallel task: enough work to amortize scheduling, small enough that B = 100
// still splits across the cores.
constexpr int64_t kGrainElements = 16384;

// Row reductions: sdml/lane_sums.h (the same bits for every vector width).
using lanes::kLanes;
using lanes::sum_lanes;


// sum_i (a_i - b_i)^2
template <typename T, typename A>
SDML_CPU_CLONES A row_sq_dist(const T* a, const T* b, int64_t n) {
  A lane[kLanes] = {};
  const int64_t full = n / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += sq(A(a[i + l]) - A(b[i + l]));
  }
  for (int64_t i = full; i < n; ++i) lane[i - full] += sq(A(a[i]) - A(b[i]));
  return sum_lanes(lane);
}

template <typename T>
bool row_labelled(const T* y, int64_t c) {
  for (int64_t i = 0; i < c; ++i)
    if (y[i] != T(0)) return true;
  return false;
}

// Rows whose projection residuals are formed by one GEMM: the buffer stays in cache, and B = 100
// still gives two tiles. A constant: tiles must not move with the thread count.
constexpr int64_t kTileRows = 64;

// e = e - y in place for one row (e holds P^T h); returns ||e||^2.
template <typename T, typename A>
A subtract_labels(T* e, const T* y, int64_t c) {
  A norm2 = 0;
  for (int64_t col = 0; col < c; ++col) {
    e[col] = T(A(e[col]) - A(y[col]));
    norm2 += sq(A(e[col]));
  }
  return norm2;
}

int64_t grain_rows(int64_t per_row) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_row, 1)); }

// Tiles of the projection work, and a grain that gives each task about kGrainElements of it.
int64_t num_tiles(int64_t B) { return (B + kTileRows - 1) / kTileRows; }
int64_t grain_tiles(int64_t per_row) { return std::max<int64_t>(1, grain_rows(per_row) / kTileRows); }

// The row-major views of one call that the row loops read: x_hat, x, y with rows unit-stride
// (copies only where they are not); h and P as given (the tile GEMMs take any strides). All
// detached: the tile GEMMs run on OpenMP threads, outside the caller's autograd guard.
struct Rows {
  at::Tensor x_hat, x, h, P, y;
  Rows(const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& P_in,
       const at::Tensor& y_in)
      : x_hat(rows_contiguous(x_hat_in).detach()), x(rows_contiguous(x_in).detach()), h(h_in.detach()),
        P(P_in.detach()), y(rows_contiguous(y_in).detach()) {}
};

// Raw row pointers and row strides of x_hat, x, y.
template <typename T>
struct RowPtrs {
  const T *xh, *x, *y;
  int64_t sxh, sx, sy;
  explicit RowPtrs(const Rows& r)
      : xh(r.x_hat.const_data_ptr<T>()), x(r.x.const_data_ptr<T>()), y(r.y.const_data_ptr<T>()),
        sxh(r.x_hat.stride(0)), sx(r.x.stride(0)), sy(r.y.stride(0)) {}
};

// Runs body(row0, n, E) for the projection tiles [tile_begin, tile_end): E [n, c] holds
// P^T h for rows row0 .. row0 + n - 1, in a buffer of this task.
template <typename Body>
void for_projection_tiles(const Rows& r, int64_t B, int64_t tile_begin, int64_t tile_end, Body&& body) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // not inherited by OpenMP threads
  const SingleThreadedBlas one_thread;
  at::Tensor buffer = at::empty({std::min(kTileRows, B), r.P.size(1)}, r.h.options());
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t row0 = t * kTileRows, n = std::min(kTileRows, B - row0);
    at::Tensor E = buffer.narrow(0, 0, n);
    at::mm_out(E, r.h.narrow(0, row0, n), r.P);
    body(row0, n, E);
  }
}

// The upstream gradients as the row loops read them: batch-level weights (math header) and
// per-row gradients of row_rec / row_sup (null when absent).
template <typename A>
struct RowWeights {
  A w_rec, w_sup;
  const A *g_row_rec, *g_row_sup;
  A alpha(int64_t j) const { return w_rec + (g_row_rec ? g_row_rec[j] : A(0)); }
  A beta(int64_t j) const { return w_sup + (g_row_sup ? g_row_sup[j] : A(0)); }
};

// Gradient row j of x_hat: alpha_j (x_hat_j - x_j) / r_j. The forward and the backward both write
// their gradient rows here, so the two agree bit for bit.
template <typename T, typename A>
void input_grad_row(const RowPtrs<T>& p, int64_t j, A row_norm, A alpha, int64_t D, T* gxh, bool stream) {
  dsae_cpu::scaled_diff_row(p.xh + j * p.sxh, p.x + j * p.sx, gxh + j * D, alpha * inv_norm_or_zero(row_norm), D,
                            stream);
}

// Whether the [B, D] gradient of x_hat goes out with streaming stores (gradient_rows.h): decided
// by the bytes of the row pass that writes it (x_hat and x read, the gradient written).
template <typename T>
bool stream_input_grad(const DsaeSizes& s) {
  return dsae_cpu::stream_gradient_rows(3 * s.B * s.D * static_cast<int64_t>(sizeof(T)));
}

// Row j's residual e (P^T h_j - y_j on labelled rows) becomes its code-gradient weights in place:
// beta_j e / s_j on labelled rows, 0 on the others; the tile's GEMM with P^T then gives grad_h.
template <typename T, typename A>
void weight_residual(T* e, bool labelled, A beta, A row_norm, int64_t c) {
  if (!labelled) {
    std::fill_n(e, c, T(0));
    return;
  }
  const A coef = beta * inv_norm_or_zero(row_norm);
  for (int64_t col = 0; col < c; ++col) e[col] = T(coef * A(e[col]));
}

// grad_h rows row0 .. row0 + n - 1 = W P^T, W the tile's weighted residuals.
inline void code_grad_tile(const Rows& r, const at::Tensor& grad_h_rows, int64_t row0, int64_t n, const at::Tensor& W) {
  at::Tensor out = grad_h_rows.narrow(0, row0, n);
  at::mm_out(out, W, r.P.t());
}

// Forward, row work: row_rec[j], whether row j is labelled and, with gxh, the gradient row of
// x_hat (weights w) while the row is still in cache.
template <typename T, typename A>
void forward_rec_rows(const RowPtrs<T>& p, const DsaeSizes& s, A* rr, uint8_t* labelled, const RowWeights<A>& w,
                      T* gxh) {
  const bool stream = gxh && stream_input_grad<T>(s);
  at::parallel_for(0, s.B, grain_rows(s.D + s.c), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      rr[j] = std::sqrt(row_sq_dist<T, A>(p.xh + j * p.sxh, p.x + j * p.sx, s.D));
      labelled[j] = row_labelled(p.y + j * p.sy, s.c);
      if (gxh) input_grad_row(p, j, rr[j], w.alpha(j), s.D, gxh, stream);
    }
    if (stream) dsae_cpu::stream_fence();
  });
}

// Forward, projection work: row_sup[j] (0 on unlabelled rows) and, with code_grad, the tile's
// rows of grad_h (weights w) from the residuals still in the tile's buffer.
template <typename T, typename A>
void forward_sup_rows(const Rows& r, const RowPtrs<T>& p, const DsaeSizes& s, const uint8_t* labelled, A* rs,
                      const RowWeights<A>& w, bool code_grad, const at::Tensor& grad_h) {
  const at::Tensor grad_h_rows = grad_h.detach();
  at::parallel_for(0, num_tiles(s.B), grain_tiles((code_grad ? 2 : 1) * s.d * s.c), [&](int64_t begin, int64_t end) {
    for_projection_tiles(r, s.B, begin, end, [&](int64_t row0, int64_t n, at::Tensor& E) {
      T* e = E.mutable_data_ptr<T>();
      for (int64_t j = row0; j < row0 + n; ++j, e += s.c) {
        rs[j] = labelled[j] ? std::sqrt(subtract_labels<T, A>(e, p.y + j * p.sy, s.c)) : A(0);
        if (code_grad) weight_residual<T, A>(e, labelled[j], w.beta(j), rs[j], s.c);
      }
      if (code_grad) code_grad_tile(r, grad_h_rows, row0, n, E);
    });
  });
}

// Forward, batch sums: loss, rec, sup, n_labelled from the row norms. Serial, in row order, in
// double: deterministic and accurate for any thread count.
template <typename T, typename A>
void forward_reduce(const A* rr, const A* rs, const uint8_t* labelled, int64_t B, double lam, const DsaeForward& out) {
  double sum_rec = 0, sum_sup = 0;
  int64_t n_lab = 0;
  for (int64_t j = 0; j < B; ++j) {
    sum_rec += rr[j];
    sum_sup += rs[j];
    n_lab += labelled[j];
  }
  const Terms<double> t = combine(sum_rec, sum_sup, B, n_lab, lam);
  *std::get<0>(out).mutable_data_ptr<T>() = T(t.loss);
  *std::get<1>(out).mutable_data_ptr<T>() = T(t.rec);
  *std::get<2>(out).mutable_data_ptr<T>() = T(t.sup);
  *std::get<5>(out).mutable_data_ptr<int64_t>() = n_lab;
}

void check_cpu_dtype(const at::Tensor& x_hat) {
  TORCH_CHECK_TYPE(x_hat.scalar_type() == at::kFloat || x_hat.scalar_type() == at::kDouble,
                   "dsae_loss: on CPU x_hat must be float32 or float64, got ", x_hat.scalar_type());
}

DsaeForward dsae_loss_cpu(const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& h_in,
                          const at::Tensor& P_in, const at::Tensor& y_in, double lam, bool check_finite,
                          bool need_input_grad, bool need_code_grad) {
  const DsaeSizes s = check_dsae_loss_args(x_hat_in, x_in, h_in, P_in, y_in, lam);
  check_cpu_dtype(x_hat_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tile GEMMs are internal
  const Rows r(x_hat_in, x_in, h_in, P_in, y_in);
  const DsaeForward out = empty_dsae_forward(r.x_hat, s, need_input_grad, need_code_grad);
  std::vector<uint8_t> labelled(s.B);
  AT_DISPATCH_FLOATING_TYPES(r.x_hat.scalar_type(), "dsae_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const RowPtrs<scalar_t> p(r);
    A *rr = std::get<3>(out).mutable_data_ptr<A>(), *rs = std::get<4>(out).mutable_data_ptr<A>();
    // The weights of an upstream gradient of 1 on the loss and none on the other outputs (what
    // loss.backward() sends), formed exactly as the backward kernel forms them.
    RowWeights<A> w{rec_weight<A>(1.0, 0.0, lam, s.B), A(0), nullptr, nullptr};
    forward_rec_rows<scalar_t, A>(p, s, rr, labelled.data(), w,
                                  need_input_grad ? std::get<6>(out).mutable_data_ptr<scalar_t>() : nullptr);
    if (need_code_grad) {
      const int64_t n_lab = std::count(labelled.begin(), labelled.end(), uint8_t(1));
      w.w_sup = sup_weight<A>(1.0, 0.0, lam, n_lab);
    }
    forward_sup_rows<scalar_t, A>(r, p, s, labelled.data(), rs, w, need_code_grad, std::get<7>(out));
    forward_reduce<scalar_t, A>(rr, rs, labelled.data(), s.B, lam, out);
  });
  if (check_finite) check_dsae_loss_finite(std::get<1>(out), std::get<2>(out), x_hat_in, x_in, h_in, P_in, y_in);
  return out;
}

double scalar_or_zero(const std::optional<at::Tensor>& g) { return g.has_value() ? g->item<double>() : 0.0; }

// Backward, row work: grad_x_hat rows = alpha_j (x_hat_j - x_j) / r_j.
template <typename T, typename A>
void input_grad_rows(const RowPtrs<T>& p, const A* rr, const RowWeights<A>& w, const DsaeSizes& s, T* gxh) {
  const bool stream = stream_input_grad<T>(s);
  at::parallel_for(0, s.B, grain_rows(s.D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) input_grad_row(p, j, rr[j], w.alpha(j), s.D, gxh, stream);
    if (stream) dsae_cpu::stream_fence();
  });
}

// Backward, projection work: grad_h rows = (beta_j / s_j) e_j P^T: a tile's residual rows are
// formed and weighted in its buffer, then one GEMM writes the tile's rows of grad_h.
template <typename T, typename A>
void code_grad_rows(const Rows& r, const RowPtrs<T>& p, const A* rs, const RowWeights<A>& w, const DsaeSizes& s,
                    at::Tensor& grad_h) {
  const at::Tensor grad_h_rows = grad_h.detach();
  at::parallel_for(0, num_tiles(s.B), grain_tiles(2 * s.d * s.c), [&](int64_t begin, int64_t end) {
    for_projection_tiles(r, s.B, begin, end, [&](int64_t row0, int64_t n, at::Tensor& E) {
      T* e = E.mutable_data_ptr<T>();
      for (int64_t j = row0; j < row0 + n; ++j, e += s.c) {
        const T* y_j = p.y + j * p.sy;
        const bool labelled = row_labelled(y_j, s.c);
        if (labelled) subtract_labels<T, A>(e, y_j, s.c);
        weight_residual<T, A>(e, labelled, w.beta(j), rs[j], s.c);
      }
      code_grad_tile(r, grad_h_rows, row0, n, E);
    });
  });
}

DsaeBackward dsae_loss_backward_cpu(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_rec,
    const std::optional<at::Tensor>& grad_sup, const std::optional<at::Tensor>& grad_row_rec,
    const std::optional<at::Tensor>& grad_row_sup, const at::Tensor& x_hat_in, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& P_in, const at::Tensor& y_in, const at::Tensor& row_rec,
    const at::Tensor& row_sup, const at::Tensor& n_labelled, double lam, bool need_input_grad,
    bool need_code_grad) {
  const DsaeSizes s = check_dsae_loss_backward_args(grad_loss, grad_rec, grad_sup, grad_row_rec, grad_row_sup,
                                                    x_hat_in, x_in, h_in, P_in, y_in, row_rec, row_sup,
                                                    n_labelled, lam);
  check_cpu_dtype(x_hat_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the tile GEMMs are internal
  const Rows r(x_hat_in, x_in, h_in, P_in, y_in);
  DsaeBackward grads = empty_dsae_backward(r.x_hat, s, need_input_grad, need_code_grad);
  at::Tensor &grad_x_hat = std::get<0>(grads), &grad_h = std::get<1>(grads);
  const auto acc_dtype = row_rec.scalar_type();
  const auto per_row = [&](const std::optional<at::Tensor>& g) {
    return g.has_value() ? g->to(acc_dtype).contiguous() : at::Tensor();
  };
  const at::Tensor g_row_rec = per_row(grad_row_rec), g_row_sup = per_row(grad_row_sup);
  const double g_loss = scalar_or_zero(grad_loss), g_rec = scalar_or_zero(grad_rec),
               g_sup = scalar_or_zero(grad_sup);
  const int64_t n_lab = n_labelled.item<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(r.x_hat.scalar_type(), "dsae_loss_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const RowPtrs<scalar_t> p(r);
    const RowWeights<A> w{rec_weight<A>(g_loss, g_rec, lam, s.B), sup_weight<A>(g_loss, g_sup, lam, n_lab),
                          g_row_rec.defined() ? g_row_rec.const_data_ptr<A>() : nullptr,
                          g_row_sup.defined() ? g_row_sup.const_data_ptr<A>() : nullptr};
    const A *rr = row_rec.const_data_ptr<A>(), *rs = row_sup.const_data_ptr<A>();
    if (need_input_grad) input_grad_rows<scalar_t, A>(p, rr, w, s, grad_x_hat.mutable_data_ptr<scalar_t>());
    if (need_code_grad) code_grad_rows<scalar_t, A>(r, p, rs, w, s, grad_h);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CPU, m) {
  m.impl("dsae_loss", &dsae_loss_cpu);
  m.impl("dsae_loss_backward", &dsae_loss_backward_cpu);
}

}  // namespace sdml
