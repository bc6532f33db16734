#pragma once
// Host entry points of the fused SDML loss op (schemas in python/registration.cpp).
#include <tuple>
#include <ATen/core/Tensor.h>

namespace sdml {

// Forward. Shapes: x_hat, x [B, D]; h [B, d]; P [d, c]; y [B, c]; one floating dtype.
// Returns loss, rec, sup (0-d, input dtype), row_rec, row_sup ([B], float32 or float64 for
// float64 inputs; row_sup is 0 on unlabelled rows) and n_labelled (0-d int64).
using DsaeForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Backward. Returns grad_x_hat [B, D] (empty unless need_input_grad) and grad_h [B, d]
// (empty unless need_code_grad).
using DsaeBackward = std::tuple<at::Tensor, at::Tensor>;

// Validates the forward arguments (shared by every device's entry point).
void check_dsae_loss_args(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& h,
                          const at::Tensor& P, const at::Tensor& y, double lam);
// Raises a ValueError naming the first non-finite input when the loss is not finite.
void check_dsae_loss_finite(const at::Tensor& rec, const at::Tensor& sup, const at::Tensor& x_hat,
                            const at::Tensor& x, const at::Tensor& h, const at::Tensor& P,
                            const at::Tensor& y);
// A copy only when rows are not unit-stride in their last dimension.
at::Tensor rows_contiguous(const at::Tensor& t);

}  // namespace sdml
