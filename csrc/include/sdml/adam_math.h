#pragma once
// One Adam update of one element, in the arithmetic of torch's fused CPU Adam
// (torch.optim.Adam(fused=True); aten/src/ATen/native/cpu/FusedAdamKernel.cpp, its vectorized
// path), so that the explicit training step (csrc/cpu/dsae_step.cpp) moves the weights exactly as
// the optimizer it replaces:
//
//   bias_correction1 = 1 - beta1^step, bias_correction2 = 1 - beta2^step      (double, per step)
//   m = lerp(m, g, 1 - beta1)           one fused multiply-add, as torch writes it
//   v = v * beta2 + ((1 - beta2) * g) * g       the last product and the sum fused
//   p = p + (-lr / bias_correction1) * m / (sqrt(v) / sqrt(bias_correction2) + eps)
//
// every constant rounded once to the element type and every operation rounded on its own except
// the two fused multiply-adds: the lerp's, which torch's source writes, and the one GCC forms
// in torch's x86 builds from v's update (-ffp-contract=fast contracts ((1 - beta2) g) g + beta2 v;
// measured against torch._fused_adam_ element for element, tests/test_dsae_step.py). They are
// written out here, and the file that uses this header is compiled with -ffp-contract=off, so
// the vector and scalar code of every width round the same way.
#include <cmath>
#include <cstdint>

namespace sdml::adam {

// The constants of one step for element type T.
template <typename T>
struct Step {
  T lerp_coeff;     // the lerp's weight 1 - beta1, or that weight - 1 when it is >= 0.5
  bool lerp_small;  // |1 - beta1| < 0.5: m + w (g - m); else g + (w - 1) (g - m)
  T beta2, sq_coeff, bias_correction2_sqrt, eps, neg_step_size;
};

// `step` counts this update (1 for the first). Doubles as torch's kernel forms them.
template <typename T>
inline Step<T> make_step(double lr, double beta1, double beta2, double eps, double step) {
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const T weight = T(1 - beta1);
  Step<T> s;
  s.lerp_small = std::abs(weight) < T(0.5);
  s.lerp_coeff = s.lerp_small ? weight : weight - T(1);
  s.beta2 = T(beta2);
  s.sq_coeff = T(1 - beta2);
  s.bias_correction2_sqrt = T(std::sqrt(bias_correction2));
  s.eps = T(eps);
  s.neg_step_size = T(-(lr / bias_correction1));
  return s;
}

// p, m, v updated in place from gradient g.
template <typename T>
inline void update(const Step<T>& s, T g, T& p, T& m, T& v) {
  const T base = s.lerp_small ? m : g;
  m = std::fma(s.lerp_coeff, g - m, base);
  v = std::fma(s.sq_coeff * g, g, v * s.beta2);
  const T denom = std::sqrt(v) / s.bias_correction2_sqrt + s.eps;
  p = p + (s.neg_step_size * m) / denom;
}

}  // namespace sdml::adam
