// Host code shared by the CPU and CUDA entry points of dsae_loss: argument checks, output
// allocation, the finite check and the CUDA launch limits.
#include "sdml/dsae_loss.h"

#include <algorithm>
#include <cmath>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include "sdml/checks.h"
#include "sdml/host_buffers.h"

namespace sdml {

namespace {
constexpr const char* kOp = "dsae_loss";
constexpr const char* kBackwardOp = "dsae_loss_backward";

// An optional upstream gradient, when present: floating, on x_hat's device, of the given shape.
void check_grad(const char* name, const std::optional<at::Tensor>& g, const at::Tensor& x_hat,
                at::IntArrayRef shape) {
  if (!g.has_value()) return;
  TORCH_CHECK_TYPE(at::isFloatingType(g->scalar_type()), kBackwardOp, ": ", name,
                   " must be a floating-point tensor, got ", g->scalar_type());
  SDML_CHECK_VALUE(g->device() == x_hat.device(), kBackwardOp, ": ", name, " is on ", g->device(),
                   " but x_hat is on ", x_hat.device(), "; move them to one device");
  SDML_CHECK_VALUE(g->sizes() == shape, kBackwardOp, ": ", name, " must have shape ", shape,
                   ", got ", g->sizes());
}

// A saved forward output: on x_hat's device, of the given shape and dtype.
void check_saved(const char* name, const at::Tensor& t, const at::Tensor& x_hat, at::IntArrayRef shape,
                 at::ScalarType dtype) {
  SDML_CHECK_VALUE(t.device() == x_hat.device(), kBackwardOp, ": ", name, " is on ", t.device(),
                   " but x_hat is on ", x_hat.device(), "; move them to one device");
  SDML_CHECK_VALUE(t.sizes() == shape, kBackwardOp, ": ", name, " must have shape ", shape, ", got ",
                   t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kBackwardOp, ": ", name, " must have dtype ", dtype,
                   ", got ", t.scalar_type());
}
}  // namespace

at::ScalarType dsae_acc_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

DsaeSizes check_dsae_loss_args(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& h,
                               const at::Tensor& P, const at::Tensor& y, double lam) {
  constexpr const char* op = kOp;
  SDML_CHECK_FLOATING(op, x_hat);
  SDML_CHECK_FLOATING(op, x);
  SDML_CHECK_FLOATING(op, h);
  SDML_CHECK_FLOATING(op, P);
  SDML_CHECK_FLOATING(op, y);
  SDML_CHECK_DIM(op, x_hat, 2);
  SDML_CHECK_DIM(op, h, 2);
  SDML_CHECK_DIM(op, P, 2);
  const int64_t B = x_hat.size(0), D = x_hat.size(1), d = h.size(1), c = P.size(1);
  SDML_CHECK_VALUE(B > 0, "dsae_loss: x_hat has no rows (an empty batch has no loss)");
  SDML_CHECK_VALUE(D > 0, "dsae_loss: x_hat has no columns");
  SDML_CHECK_SHAPE(op, x, B, D);
  SDML_CHECK_VALUE(h.size(0) == B, "dsae_loss: h must have one row per row of x_hat (", B,
                   "), got shape ", h.sizes());
  SDML_CHECK_VALUE(d > 0, "dsae_loss: h has no columns");
  SDML_CHECK_VALUE(P.size(0) == d, "dsae_loss: P must be d x c with d = h.size(1) = ", d,
                   ", got shape ", P.sizes());
  SDML_CHECK_VALUE(c > 0, "dsae_loss: P has no columns (no classes)");
  SDML_CHECK_VALUE(c <= d, "dsae_loss: P has c = ", c, " columns but d = ", d,
                   " rows; SDML needs c <= d (P has orthonormal columns)");
  SDML_CHECK_SHAPE(op, y, B, c);
  SDML_CHECK_SAME_DTYPE(op, x, x_hat);
  SDML_CHECK_SAME_DTYPE(op, h, x_hat);
  SDML_CHECK_SAME_DTYPE(op, P, x_hat);
  SDML_CHECK_SAME_DTYPE(op, y, x_hat);
  SDML_CHECK_DEVICE(op, x, x_hat);
  SDML_CHECK_DEVICE(op, h, x_hat);
  SDML_CHECK_DEVICE(op, P, x_hat);
  SDML_CHECK_DEVICE(op, y, x_hat);
  SDML_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0,
                   "dsae_loss: lam must be in [0, 1], got ", lam);
  return {B, D, d, c};
}

DsaeSizes check_dsae_loss_backward_args(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_rec,
    const std::optional<at::Tensor>& grad_sup, const std::optional<at::Tensor>& grad_row_rec,
    const std::optional<at::Tensor>& grad_row_sup, const at::Tensor& x_hat, const at::Tensor& x,
    const at::Tensor& h, const at::Tensor& P, const at::Tensor& y, const at::Tensor& row_rec,
    const at::Tensor& row_sup, const at::Tensor& n_labelled, double lam) {
  const DsaeSizes s = check_dsae_loss_args(x_hat, x, h, P, y, lam);
  const at::ScalarType acc = dsae_acc_dtype(x_hat.scalar_type());
  check_saved("row_rec", row_rec, x_hat, {s.B}, acc);
  check_saved("row_sup", row_sup, x_hat, {s.B}, acc);
  check_saved("n_labelled", n_labelled, x_hat, {}, at::kLong);
  check_grad("grad_loss", grad_loss, x_hat, {});
  check_grad("grad_rec", grad_rec, x_hat, {});
  check_grad("grad_sup", grad_sup, x_hat, {});
  check_grad("grad_row_rec", grad_row_rec, x_hat, {s.B});
  check_grad("grad_row_sup", grad_row_sup, x_hat, {s.B});
  return s;
}

DsaeBackward empty_dsae_backward(const at::Tensor& x_hat, const DsaeSizes& s, bool need_input_grad,
                                 bool need_code_grad) {
  const auto empty = [&](int64_t rows, int64_t cols) {
    return x_hat.is_cpu() ? empty_large_cpu({rows, cols}, x_hat.options())
                          : at::empty({rows, cols}, x_hat.options());
  };
  return {empty(need_input_grad ? s.B : 0, s.D), empty(need_code_grad ? s.B : 0, s.d)};
}

DsaeForward empty_dsae_forward(const at::Tensor& x_hat, const DsaeSizes& s, bool need_input_grad,
                               bool need_code_grad) {
  const at::TensorOptions opts = x_hat.options();
  const at::TensorOptions acc = opts.dtype(dsae_acc_dtype(x_hat.scalar_type()));
  auto [grad_x_hat, grad_h] = empty_dsae_backward(x_hat, s, need_input_grad, need_code_grad);
  return {at::empty({}, opts),   at::empty({}, opts),   at::empty({}, opts),
          at::empty({s.B}, acc), at::empty({s.B}, acc), at::zeros({}, opts.dtype(at::kLong)),
          std::move(grad_x_hat), std::move(grad_h)};
}

void check_dsae_loss_finite(const at::Tensor& rec, const at::Tensor& sup, const at::Tensor& x_hat,
                            const at::Tensor& x, const at::Tensor& h, const at::Tensor& P,
                            const at::Tensor& y) {
  // Every non-finite input makes a row norm non-finite, so the inputs are scanned only then.
  if (rec.isfinite().logical_and(sup.isfinite()).item<bool>()) return;
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"x_hat", &x_hat}, {"x", &x}, {"h", &h}, {"P", &P}, {"y", &y}};
  for (const auto& [name, t] : inputs) {
    SDML_CHECK_VALUE(t->isfinite().all().item<bool>(), "dsae_loss: ", name,
                     " contains NaN or Inf");
  }
  SDML_CHECK_VALUE(false, "dsae_loss: the loss overflowed ", x_hat.scalar_type(),
                   " although every input is finite; scale the inputs down or use a wider dtype");
}

DsaeCudaPlan check_dsae_loss_cuda_limits(const DsaeSizes& s, int64_t sm_count) {
  SDML_CHECK_VALUE(s.B <= kDsaeCudaMaxRows, "dsae_loss: on CUDA x_hat must have at most ",
                   kDsaeCudaMaxRows, " rows (a grid row of thread blocks per row), got ", s.B);
  const int64_t target = kDsaeCudaBlocksPerSm * std::max<int64_t>(sm_count, 1);
  const int64_t wanted = (target + s.B - 1) / s.B;
  const int64_t most = std::max<int64_t>(1, s.D / kDsaeCudaMinSlice);  // each split reads >= kDsaeCudaMinSlice
  const int64_t splits = std::min(wanted, most);
  const int64_t slice = (s.D + splits - 1) / splits;
  const int64_t aligned = (slice + 7) / 8 * 8;
  return {(s.D + aligned - 1) / aligned, aligned};
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace sdml
