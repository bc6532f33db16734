// Schemas of the DSAE training-step kernels: the CPU's autograd-free step
// (sdml_ext/engine/explicit_step.py; kernels in csrc/cpu/dsae_step.cpp, checks in
// csrc/dsae_step_checks.cpp, Python face and fake implementations in sdml_ext/ops/dsae_step.py).
// Each writes into buffers it is given (marked (a!) ...) and returns nothing; none has autograd.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sdml, m) {
  // out [B, n] = act(out + bias): the forward's bias and ReLU after its GEMM.
  m.def("dense_bias_act(Tensor(a!) out, Tensor bias, bool relu) -> ()");
  // out [B, n_out] = act(input [B, n_in] weight [n_out, n_in]^T + bias): a Linear layer's forward.
  m.def("dense_forward(Tensor input, Tensor weight, Tensor bias, bool relu, Tensor(a!) out) -> ()");
  // grad_input [B, n_in] = grad_out [B, n_out] weight (added to grad_input when accumulate).
  m.def("dense_input_grad(Tensor grad_out, Tensor weight, Tensor(a!) grad_input, bool accumulate) -> ()");
  // out = v / max(||v_j||, eps) per row, norm [B] = ||v_j||.
  m.def("normalize_rows(Tensor v, float eps, Tensor(a!) out, Tensor(b!) norm) -> ()");
  // grad_input = d v of normalize_rows from grad (the gradient of out); column_sums its column sums.
  m.def(
      "normalize_rows_backward(Tensor grad, Tensor out, Tensor norm, float eps, Tensor(a!) grad_input, "
      "Tensor(b!)? column_sums=None) -> ()");
  // grad *= (activation > 0) when activation is given; grad_bias = column sums of grad.
  m.def("dense_grad(Tensor(a!) grad, Tensor? activation, Tensor(b!) grad_bias) -> ()");
  // One Adam update (torch's fused Adam arithmetic; `step` counts this update, from 1).
  m.def(
      "adam_update(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
      "float beta1, float beta2, float eps, float step) -> ()");
  // The weight gradient grad_out^T input, applied by Adam tile by tile (copied to grad_weight when given).
  m.def(
      "linear_weight_grad_adam(Tensor grad_out, Tensor input, Tensor(a!) weight, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, float lr, float beta1, float beta2, float eps, float step, "
      "Tensor(d!)? grad_weight=None) -> ()");
}
