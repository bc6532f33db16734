#pragma once
// Host side of the fused SDML loss op, shared by the CPU and CUDA entry points: argument checks,
// sizes, output allocation and the CUDA launch limits (schemas in csrc/registration/dsae_loss.cpp).
// Compiled into every build, so the CUDA limit checks run (and are tested) without a GPU.
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <ATen/core/Tensor.h>

namespace sdml {

// Forward. Shapes: x_hat, x [B, D]; h [B, d]; P [d, c]; y [B, c]; one floating dtype.
// Returns loss, rec, sup (0-d, input dtype), row_rec, row_sup ([B], the accumulation dtype:
// float32, float64 for float64 inputs; row_sup is 0 on unlabelled rows), n_labelled (0-d int64),
// and grad_x_hat [B, D] / grad_h [B, d]: the gradients of loss for an upstream gradient of 1 (what
// the backward would return for grad_loss = 1 alone), with 0 rows unless need_input_grad /
// need_code_grad.
using DsaeForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor>;
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

// The forward's outputs on x_hat's device, uninitialized except n_labelled = 0; the gradients as
// empty_dsae_backward allocates them.
DsaeForward empty_dsae_forward(const at::Tensor& x_hat, const DsaeSizes& s, bool need_input_grad,
                               bool need_code_grad);

// The backward's outputs (see DsaeBackward), uninitialized; large CPU ones come from the block
// cache of host_buffers.h.
DsaeBackward empty_dsae_backward(const at::Tensor& x_hat, const DsaeSizes& s, bool need_input_grad,
                                 bool need_code_grad);

// Raises a ValueError naming the first non-finite input when the loss is not finite.
void check_dsae_loss_finite(const at::Tensor& rec, const at::Tensor& sup, const at::Tensor& x_hat,
                            const at::Tensor& x, const at::Tensor& h, const at::Tensor& P,
                            const at::Tensor& y);

// Launch plan of the CUDA kernels. A grid of (B, splits) blocks of kDsaeCudaThreads threads:
// block (j, s) reads x_hat_j and x_j over columns [s * slice, (s + 1) * slice) with 16-byte loads
// where the rows are aligned, so that a small batch still fills every multiprocessor (at least
// kDsaeCudaBlocksPerSm blocks per SM when D allows); block (j, 0) also forms P^T h_j - y_j (a warp
// per column of P, h_j read through the L1 cache) and, in the backward, the row's code gradient
// (the residual through a global [B, c] scratch, so no shared memory scales with d or c: the
// kernels have no limit on d + c). The partial sums are added in a fixed order by the finalize
// kernel (deterministic, no float atomics).
constexpr int kDsaeCudaThreads = 256;
constexpr int64_t kDsaeCudaMaxRows = 2147483647;  // gridDim.x
constexpr int64_t kDsaeCudaBlocksPerSm = 4;
// Columns per block at least this (a few 16-byte loads per thread), a multiple of 8 (16 bytes
// of the narrowest dtype), so every slice of an aligned row starts aligned.
constexpr int64_t kDsaeCudaMinSlice = 8 * kDsaeCudaThreads;
struct DsaeCudaPlan {
  int64_t splits, slice;
};
// Raises a ValueError naming the size when a call of these sizes exceeds the limits (the rows:
// gridDim.x); returns the plan for a device of sm_count multiprocessors.
DsaeCudaPlan check_dsae_loss_cuda_limits(const DsaeSizes& s, int64_t sm_count);

// How the CPU kernel writes its [B, D] input gradients on this machine (ordinary or streaming
// stores, and when), in one line for build_info(); csrc/cpu/dsae_loss/gradient_rows.h.
std::string dsae_loss_cpu_stores();

// A copy only when rows are not unit-stride in their last dimension.
at::Tensor rows_contiguous(const at::Tensor& t);

}  // namespace sdml
