#include "bf16_rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sdml/host_buffers.h"
#include "sdml/macros.h"

namespace sdml::cpu_retrieval {
namespace {

// x rounded to the nearest bf16 (ties to even), a subnormal result flushed to (signed) zero. x is
// finite (the inputs are checked) and at most ~1 in magnitude (normalized rows): no overflow.
inline uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  uint16_t b = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  if ((b & 0x7F80u) == 0) b &= 0x8000u;
  return b;
}

inline float from_bf16(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One row x (divided by `divisor`, into y, where y is given): its bf16 copy into out, and the
// sums of squares of x, x~ - x and x~ (exact products of floats in double; the differences of
// two floats this close are exact in double), summed in any order (the caller's rounding-up
// covers any).
SDML_CPU_CLONES void convert_row(const float* x, float divisor, float* y, int64_t d, uint16_t* out, double sums[3]) {
  double xx = 0, ee = 0, bb = 0;
#pragma omp simd reduction(+ : xx, ee, bb)
  for (int64_t j = 0; j < d; ++j) {
    float v = x[j];
    if (y) {
      v = v / divisor;
      y[j] = v;
    }
    const uint16_t b = to_bf16(v);
    out[j] = b;
    const double w = from_bf16(b), e = w - double(v);
    xx += double(v) * double(v);
    ee += e * e;
    bb += w * w;
  }
  sums[0] = xx, sums[1] = ee, sums[2] = bb;
}

Bf16Rows convert(const at::Tensor& rows, const at::Tensor* divisors) {
  const int64_t n = rows.size(0), d = rows.size(1);
  Bf16Rows r{divisors ? empty_large_cpu({n, d}, rows.options()) : at::Tensor(),
             empty_large_cpu({n, d}, rows.options().dtype(at::kBFloat16)), std::vector<Bf16RowTerms>(n), {}};
  const float* x = rows.const_data_ptr<float>();
  const float* div = divisors ? divisors->const_data_ptr<float>() : nullptr;
  float* y = divisors ? r.normalized.mutable_data_ptr<float>() : nullptr;
  auto* out = reinterpret_cast<uint16_t*>(r.values.mutable_data_ptr<at::BFloat16>());
  // A double sum of d squares and its square root: relative error below (d + 2) 2^-53; rounded up.
  const double up = 1 + (static_cast<double>(d) + 4) * std::ldexp(1.0, -52);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double sums[3];
      convert_row(x + i * d, div ? div[i] : 1.0f, y ? y + i * d : nullptr, d, out + i * d, sums);
      r.terms[i] = {std::sqrt(sums[0]) * up, std::sqrt(sums[1]) * up, std::sqrt(sums[2]) * up};
    }
  });
  for (const Bf16RowTerms& t : r.terms) {
    r.max.norm = std::max(r.max.norm, t.norm);
    r.max.err = std::max(r.max.err, t.err);
    r.max.norm_bf16 = std::max(r.max.norm_bf16, t.norm_bf16);
  }
  return r;
}

}  // namespace

Bf16Rows bf16_rows(const at::Tensor& rows) { return convert(rows, nullptr); }

Bf16Rows bf16_rows(const at::Tensor& rows, const at::Tensor& divisors) {
  TORCH_CHECK(divisors.is_contiguous() && divisors.numel() == rows.size(0) && divisors.scalar_type() == at::kFloat,
              "bf16_rows: divisors must be float32 [n, 1]");
  return convert(rows, &divisors);
}

}  // namespace sdml::cpu_retrieval
