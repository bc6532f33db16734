#pragma once
// The SDML objective for one batch of one modality, row by row. Shared by the CPU kernel
// (csrc/cpu/dsae_loss.cpp) and the CUDA kernel (csrc/cuda/dsae_loss.cu).
//
//   r_j = || x_hat_j - x_j ||_2                      reconstruction residual norm
//   e_j = P^T h_j - y_j,  s_j = || e_j ||_2           projection residual (labelled rows only)
//   loss = lam * mean_j r_j + (1 - lam) * mean_{j labelled} s_j
//
// Row j is labelled when y_j has a non-zero entry. Gradients (g_* = upstream gradients of the
// op's outputs loss, rec, sup, row_rec[j], row_sup[j]):
//   d/dx_hat_j = alpha_j * (x_hat_j - x_j) / r_j,    alpha_j = (lam g_loss + g_rec) / B + g_row_rec[j]
//   d/dh_j     = beta_j  * P e_j / s_j,              beta_j  = ((1-lam) g_loss + g_sup) / L + g_row_sup[j]
// with 1/r := 0 at r = 0 (the subgradient of a norm at its kink: no NaN for a perfect row).
// P^T h_j itself is a plain product: the CPU kernel forms it by a GEMM per tile of rows, the CUDA
// kernel by a warp per column of P; both keep it out of memory.
#include <cstdint>
#include "sdml/macros.h"

namespace sdml::dsae {

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// One element's contribution to a squared norm.
template <typename A> SDML_HD A sq(A v) { return v * v; }

// 1 / norm, defined as 0 where the norm is 0.
template <typename A> SDML_HD A inv_norm_or_zero(A norm) {
  return norm > A(0) ? A(1) / norm : A(0);
}

// The batch-level weight of every row's reconstruction term (before the per-row gradient).
template <typename A> SDML_HD A rec_weight(A g_loss, A g_rec, A lam, int64_t batch) {
  return (lam * g_loss + g_rec) / A(batch);
}

// The batch-level weight of every labelled row's projection term; 0 when no row is labelled.
template <typename A> SDML_HD A sup_weight(A g_loss, A g_sup, A lam, int64_t n_labelled) {
  return n_labelled > 0 ? ((A(1) - lam) * g_loss + g_sup) / A(n_labelled) : A(0);
}

// The three reported terms from the row sums.
template <typename A> struct Terms { A loss, rec, sup; };
template <typename A>
SDML_HD Terms<A> combine(A sum_rec, A sum_sup, int64_t batch, int64_t n_labelled, A lam) {
  Terms<A> t;
  t.rec = sum_rec / A(batch);
  t.sup = n_labelled > 0 ? sum_sup / A(n_labelled) : A(0);
  t.loss = lam * t.rec + (A(1) - lam) * t.sup;
  return t;
}

}  // namespace sdml::dsae
