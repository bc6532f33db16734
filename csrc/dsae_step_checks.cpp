// Argument checks of the DSAE training-step kernels (see sdml/dsae_step.h). The Python fake
// implementations (sdml_ext/ops/dsae_step.py) run the same checks with the same messages.
#include "sdml/dsae_step.h"

#include <climits>
#include <cmath>
#include "sdml/checks.h"

#include <ATen/MemoryOverlap.h>

namespace sdml {

namespace {

// t: float32/float64, of ref's dtype and device, contiguous, of the given shape.
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                   const char* ref_name, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has dtype ", ref.scalar_type(), "; cast them to one floating dtype");
  SDML_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                   " is on ", ref.device(), "; move them to one device");
  SDML_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  SDML_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A [B, n] row block with B, n >= 1: returns {B, n}.
std::pair<int64_t, int64_t> check_rows(const char* op, const char* name, const at::Tensor& t) {
  SDML_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", t.sizes());
  SDML_CHECK_VALUE(t.size(0) > 0 && t.size(1) > 0, op, ": ", name, " must have rows and columns, got shape ",
                   t.sizes());
  check_operand(op, name, t, t, name, t.sizes());
  return {t.size(0), t.size(1)};
}

void check_eps(const char* op, double eps) {
  SDML_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
}

}  // namespace

void check_dense_bias_act_args(const at::Tensor& out, const at::Tensor& bias) {
  constexpr const char* op = "dense_bias_act";
  const auto [B, n] = check_rows(op, "out", out);
  (void)B;
  check_operand(op, "bias", bias, out, "out", {n});
}

namespace {

// A weight [n_out, n_in] matching the block beside it (n_in given, n_out >= 1): returns n_out.
int64_t check_weight(const char* op, const at::Tensor& weight, const at::Tensor& ref, const char* ref_name,
                     int64_t n_in) {
  SDML_CHECK_VALUE(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) == n_in, op,
                   ": weight must be [n_out, n_in] with n_in = ", n_in, " (", ref_name, "'s columns) and n_out >= 1, got shape ",
                   weight.sizes());
  check_operand(op, "weight", weight, ref, ref_name, weight.sizes());
  return weight.size(0);
}

// The written block must not share memory with an operand (the GEMM reads them while it writes).
// Not in the fakes: fake tensors have no memory to compare.
void check_no_overlap(const char* op, const char* name, const at::Tensor& written, const char* other_name,
                      const at::Tensor& other) {
  SDML_CHECK_VALUE(at::get_overlap_status(written, other) == at::MemOverlapStatus::No, op, ": ", name,
                   " must not share memory with ", other_name);
}

}  // namespace

void check_dense_forward_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& out) {
  constexpr const char* op = "dense_forward";
  const auto [B, n_in] = check_rows(op, "input", input);
  const int64_t n_out = check_weight(op, weight, input, "input", n_in);
  check_operand(op, "bias", bias, input, "input", {n_out});
  check_operand(op, "out", out, input, "input", {B, n_out});
  SDML_CHECK_VALUE(B <= INT_MAX && n_out <= INT_MAX && n_in <= INT_MAX, op,
                   ": sizes must fit the BLAS's 32-bit integers, got input ", input.sizes(), " and weight ",
                   weight.sizes());
  check_no_overlap(op, "out", out, "input", input);
  check_no_overlap(op, "out", out, "weight", weight);
  check_no_overlap(op, "out", out, "bias", bias);
}

void check_dense_input_grad_args(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& grad_input) {
  constexpr const char* op = "dense_input_grad";
  const auto [B, n_out] = check_rows(op, "grad_out", grad_out);
  SDML_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == n_out && weight.size(1) > 0, op,
                   ": weight must be [n_out, n_in] with n_out = ", n_out, " (grad_out's columns) and n_in >= 1, got shape ",
                   weight.sizes());
  check_operand(op, "weight", weight, grad_out, "grad_out", weight.sizes());
  const int64_t n_in = weight.size(1);
  check_operand(op, "grad_input", grad_input, grad_out, "grad_out", {B, n_in});
  SDML_CHECK_VALUE(B <= INT_MAX && n_out <= INT_MAX && n_in <= INT_MAX, op,
                   ": sizes must fit the BLAS's 32-bit integers, got grad_out ", grad_out.sizes(), " and weight ",
                   weight.sizes());
  check_no_overlap(op, "grad_input", grad_input, "grad_out", grad_out);
  check_no_overlap(op, "grad_input", grad_input, "weight", weight);
}

void check_normalize_rows_args(const at::Tensor& v, double eps, const at::Tensor& out, const at::Tensor& norm) {
  constexpr const char* op = "normalize_rows";
  const auto [B, n] = check_rows(op, "v", v);
  check_eps(op, eps);
  check_operand(op, "out", out, v, "v", {B, n});
  check_operand(op, "norm", norm, v, "v", {B});
}

void check_normalize_rows_backward_args(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& norm,
                                        double eps, const at::Tensor& grad_input,
                                        const std::optional<at::Tensor>& column_sums) {
  constexpr const char* op = "normalize_rows_backward";
  const auto [B, n] = check_rows(op, "grad", grad);
  check_eps(op, eps);
  check_operand(op, "out", out, grad, "grad", {B, n});
  check_operand(op, "norm", norm, grad, "grad", {B});
  check_operand(op, "grad_input", grad_input, grad, "grad", {B, n});
  if (column_sums.has_value()) check_operand(op, "column_sums", *column_sums, grad, "grad", {n});
}

void check_dense_grad_args(const at::Tensor& grad, const std::optional<at::Tensor>& activation,
                           const at::Tensor& grad_bias) {
  constexpr const char* op = "dense_grad";
  const auto [B, n] = check_rows(op, "grad", grad);
  if (activation.has_value()) check_operand(op, "activation", *activation, grad, "grad", {B, n});
  check_operand(op, "grad_bias", grad_bias, grad, "grad", {n});
}

void check_adam_hyper(const char* op, double lr, double beta1, double beta2, double eps, double step) {
  SDML_CHECK_VALUE(lr > 0 && std::isfinite(lr), op, ": lr must be positive and finite, got ", lr);
  SDML_CHECK_VALUE(beta1 >= 0 && beta1 < 1, op, ": beta1 must be in [0, 1), got ", beta1);
  SDML_CHECK_VALUE(beta2 >= 0 && beta2 < 1, op, ": beta2 must be in [0, 1), got ", beta2);
  check_eps(op, eps);
  SDML_CHECK_VALUE(step >= 1 && step == std::floor(step) && std::isfinite(step), op,
                   ": step must be a whole number >= 1 (this update's count), got ", step);
}

void check_adam_update_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                            double step) {
  constexpr const char* op = "adam_update";
  check_operand(op, "param", param, param, "param", param.sizes());
  check_operand(op, "grad", grad, param, "param", param.sizes());
  check_operand(op, "exp_avg", exp_avg, param, "param", param.sizes());
  check_operand(op, "exp_avg_sq", exp_avg_sq, param, "param", param.sizes());
  check_adam_hyper(op, lr, beta1, beta2, eps, step);
}

void check_linear_weight_grad_adam_args(const at::Tensor& grad_out, const at::Tensor& input,
                                        const at::Tensor& weight, const at::Tensor& exp_avg,
                                        const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                                        double eps, double step, const std::optional<at::Tensor>& grad_weight) {
  constexpr const char* op = "linear_weight_grad_adam";
  const auto [B, n_out] = check_rows(op, "grad_out", grad_out);
  SDML_CHECK_VALUE(input.dim() == 2 && input.size(0) == B && input.size(1) > 0, op,
                   ": input must be [B, n_in] with B = grad_out.size(0) = ", B, " and n_in >= 1, got shape ",
                   input.sizes());
  const int64_t n_in = input.size(1);
  check_operand(op, "input", input, grad_out, "grad_out", {B, n_in});
  check_operand(op, "weight", weight, grad_out, "grad_out", {n_out, n_in});
  check_operand(op, "exp_avg", exp_avg, grad_out, "grad_out", {n_out, n_in});
  check_operand(op, "exp_avg_sq", exp_avg_sq, grad_out, "grad_out", {n_out, n_in});
  if (grad_weight.has_value()) check_operand(op, "grad_weight", *grad_weight, grad_out, "grad_out", {n_out, n_in});
  SDML_CHECK_VALUE(B <= INT_MAX && n_out <= INT_MAX && n_in <= INT_MAX, op,
                   ": sizes must fit the BLAS's 32-bit integers, got grad_out ", grad_out.sizes(), " and input ",
                   input.sizes());
  check_adam_hyper(op, lr, beta1, beta2, eps, step);
}

}  // namespace sdml
