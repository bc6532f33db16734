// Argument validation and error reporting shared by the CPU and CUDA entry points of dsae_loss.
#include "sdml/dsae_loss.h"

#include <cmath>
#include "sdml/checks.h"

namespace sdml {

void check_dsae_loss_args(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& h,
                          const at::Tensor& P, const at::Tensor& y, double lam) {
  constexpr const char* op = "dsae_loss";
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

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace sdml
