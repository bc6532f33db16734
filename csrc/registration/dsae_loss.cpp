// Schemas of the fused SDML loss op (kernels in csrc/cpu/dsae_loss.cpp and csrc/cuda/dsae_loss.cu;
// the Python face, fake implementation and autograd in sdml_ext/ops/dsae_loss.py). Shapes:
// x_hat, x [B, D]; h [B, d]; P [d, c]; y [B, c]; see csrc/include/sdml/dsae_loss.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sdml, m) {
  // Fused SDML objective of one modality's batch; see csrc/include/sdml/dsae_loss_math.h.
  // need_input_grad / need_code_grad: also return grad_x_hat [B, D] / grad_h [B, d], the gradients
  // of loss for an upstream gradient of 1, formed while each row is in cache (0 rows when not
  // asked). They are for the autograd formula (sdml_ext/ops/dsae_loss.py): the Python face asks
  // for them when autograd will need them and never returns them; the backward of a loss-only
  // upstream gradient hands them on, times that gradient (in place only when the Python face
  // dropped them: a direct caller's outputs are left as they are).
  m.def(
      "dsae_loss(Tensor x_hat, Tensor x, Tensor h, Tensor P, Tensor y, float lam, "
      "bool check_finite=True, bool need_input_grad=False, bool need_code_grad=False) -> "
      "(Tensor loss, Tensor rec, Tensor sup, Tensor row_rec, Tensor row_sup, Tensor n_labelled, "
      "Tensor grad_x_hat, Tensor grad_h)");
  m.def(
      "dsae_loss_backward(Tensor? grad_loss, Tensor? grad_rec, Tensor? grad_sup, "
      "Tensor? grad_row_rec, Tensor? grad_row_sup, Tensor x_hat, Tensor x, Tensor h, Tensor P, "
      "Tensor y, Tensor row_rec, Tensor row_sup, Tensor n_labelled, float lam, "
      "bool need_input_grad, bool need_code_grad) -> (Tensor grad_x_hat, Tensor grad_h)");
}
