#pragma once
// Host side of the fused SDML loss op, shared by the CPU and CUDA entry points: argument checks,
// sizes, output allocation and the CUDA launch limits (schemas in csrc/registration/dsae_loss.cpp).
// Compiled into every build, so the CUDA limit checks run (and are tested) without a GPU.
#include <cstdint>
#include <optional>
#include <tuple>
#include <ATen/core/Tensor.h>

namespace sdml {

// Forward. Shapes: x_hat, x [B, D]; h [B, d]; P [d, c]; y [B, c]; one floating dtype.
// Returns loss, rec, sup (0-d, input dtype), row_rec, row_sup ([B], the accumulation dtype:
// float32, float64 for float64 inputs; row_sup is 0 on unlabelled rows) and n_labelled (0-d int64).
using DsaeForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Backward. Returns grad_x_hat [B, D] (0 rows unless need_input_grad) and grad_h [B, d]
// (0 rows unless need_code_grad).
using DsaeBackward = std::tuple<at::Tensor, at::Tensor>;

// The sizes of one call: x_hat, x [B, D]; h [B, d]; P [d, c]; y [B, c].
struct DsaeSizes {
  int64_t B, D, d, c;
};

// The dtype of row_rec / row_sup and of every accumulation: float64 for float64 inputs, else float32.
at::ScalarType dsae_acc_dtype(at::ScalarType input_dtype);

// Validates the forward arguments (every device's entry point calls it first); returns the sizes.
DsaeSizes check_dsae_loss_args(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& h,
                               const at::Tensor& P, const at::Tensor& y, double lam);

// Validates the backward arguments: the forward's, the saved forward outputs (row_rec, row_sup
// [B] in the accumulation dtype, n_labelled 0-d int64) and the upstream gradients (grad_loss,
// grad_rec, grad_sup one element each; grad_row_rec, grad_row_sup [B]; any may be absent).
DsaeSizes check_dsae_loss_backward_args(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_rec,
    const std::optional<at::Tensor>& grad_sup, const std::optional<at::Tensor>& grad_row_rec,
    const std::optional<at::Tensor>& grad_row_sup, const at::Tensor& x_hat, const at::Tensor& x,
    const at::Tensor& h, const at::Tensor& P, const at::Tensor& y, const at::Tensor& row_rec,
    const at::Tensor& row_sup, const at::Tensor& n_labelled, double lam);

// The forward's outputs for B rows on x_hat's device, uninitialized except n_labelled = 0.
DsaeForward empty_dsae_forward(const at::Tensor& x_hat, int64_t B);

// The backward's outputs (see DsaeBackward), uninitialized; large CPU ones come from the block
// cache of host_buffers.h.
DsaeBackward empty_dsae_backward(const at::Tensor& x_hat, const DsaeSizes& s, bool need_input_grad,
                                 bool need_code_grad);

// Raises a ValueError naming the first non-finite input when the loss is not finite.
void check_dsae_loss_finite(const at::Tensor& rec, const at::Tensor& sup, const at::Tensor& x_hat,
                            const at::Tensor& x, const at::Tensor& h, const at::Tensor& P,
                            const at::Tensor& y);

// Limits of the CUDA kernels: one block of kDsaeCudaThreads threads per row (a grid of at most
// kDsaeCudaMaxRows blocks). A block's shared memory, static and dynamic together, is at most
// kDsaeCudaSharedBytes (the limit without an opt-in): a reduction scratch of one accumulation-dtype
// value per warp (static), and h_j and P^T h_j - y_j, (d + c) values (dynamic).
constexpr int kDsaeCudaThreads = 256;
constexpr int64_t kDsaeCudaMaxRows = 2147483647;  // gridDim.x
constexpr int64_t kDsaeCudaSharedBytes = 48 * 1024;
// Raises a ValueError naming the size when a call of these sizes and dtype exceeds the limits;
// returns the dynamic shared memory bytes a block needs.
int64_t check_dsae_loss_cuda_limits(const DsaeSizes& s, at::ScalarType input_dtype);

// A copy only when rows are not unit-stride in their last dimension.
at::Tensor rows_contiguous(const at::Tensor& t);

}  // namespace sdml
