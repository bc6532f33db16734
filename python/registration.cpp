// Op schemas, declared once. Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) implementations and autograd live in sdml_ext/ops/.
#include <torch/library.h>

// Other op families add theirs with TORCH_LIBRARY_FRAGMENT(sdml, m) in python/registration_*.cpp.
TORCH_LIBRARY(sdml, m) {
  // Fused SDML objective of one modality's batch; see csrc/include/sdml/dsae_loss_math.h.
  m.def(
      "dsae_loss(Tensor x_hat, Tensor x, Tensor h, Tensor P, Tensor y, float lam, "
      "bool check_finite=True) -> (Tensor loss, Tensor rec, Tensor sup, Tensor row_rec, "
      "Tensor row_sup, Tensor n_labelled)");
  m.def(
      "dsae_loss_backward(Tensor? grad_loss, Tensor? grad_rec, Tensor? grad_sup, "
      "Tensor? grad_row_rec, Tensor? grad_row_sup, Tensor x_hat, Tensor x, Tensor h, Tensor P, "
      "Tensor y, Tensor row_rec, Tensor row_sup, Tensor n_labelled, float lam, "
      "bool need_input_grad, bool need_code_grad) -> (Tensor grad_x_hat, Tensor grad_h)");
}
