#pragma once
// Host side of the DSAE training-step kernels (the autograd-free CPU step of
// sdml_ext/engine/explicit_step.py; schemas in csrc/registration/dsae_step.cpp, kernels in
// csrc/cpu/dsae_step.cpp): the argument checks every entry point runs first. All operands are
// contiguous float32 or float64 tensors of one dtype; activations and gradients are [B, n] row
// blocks, weights [n_out, n_in], biases and norms vectors.
#include <optional>
#include <ATen/core/Tensor.h>

namespace sdml {

// dense_bias_act: out [B, n] (written), bias [n].
void check_dense_bias_act_args(const at::Tensor& out, const at::Tensor& bias);

// dense_forward: input [B, n_in], weight [n_out, n_in], bias [n_out], out [B, n_out] (written).
void check_dense_forward_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& out);

// dense_input_grad: grad_out [B, n_out], weight [n_out, n_in], grad_input [B, n_in] (written or added to).
void check_dense_input_grad_args(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& grad_input);

// normalize_rows: v [B, n], out [B, n] (written), norm [B] (written), eps >= 0.
void check_normalize_rows_args(const at::Tensor& v, double eps, const at::Tensor& out, const at::Tensor& norm);

// normalize_rows_backward: grad, out, grad_input [B, n] (written), norm [B], eps >= 0,
// column_sums [n] (written) when given.
void check_normalize_rows_backward_args(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& norm,
                                        double eps, const at::Tensor& grad_input,
                                        const std::optional<at::Tensor>& column_sums);

// dense_grad: grad [B, n] (written), activation [B, n] when given, grad_bias [n] (written).
void check_dense_grad_args(const at::Tensor& grad, const std::optional<at::Tensor>& activation,
                           const at::Tensor& grad_bias);

// Adam's hyper-parameters: lr > 0 finite, betas in [0, 1), eps >= 0, step >= 1 (an integer).
void check_adam_hyper(const char* op, double lr, double beta1, double beta2, double eps, double step);

// adam_update: param, grad, exp_avg, exp_avg_sq of one shape (1-D or any rank, contiguous).
void check_adam_update_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                            double step);

// linear_weight_grad_adam: grad_out [B, n_out], input [B, n_in], weight / exp_avg / exp_avg_sq
// [n_out, n_in] (written), grad_weight [n_out, n_in] (written) when given.
void check_linear_weight_grad_adam_args(const at::Tensor& grad_out, const at::Tensor& input,
                                        const at::Tensor& weight, const at::Tensor& exp_avg,
                                        const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                                        double eps, double step, const std::optional<at::Tensor>& grad_weight);

}  // namespace sdml
