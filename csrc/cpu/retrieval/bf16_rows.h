#pragma once
// The bf16 copies of normalized float32 rows that the bf16 top-k scores (precision="bf16"), and
// each row's rounding terms for its error bound (sdml/topk_precision.h).
#include <ATen/core/Tensor.h>

#include <vector>

#include "sdml/topk_precision.h"

namespace sdml::cpu_retrieval {

struct Bf16Rows {
  at::Tensor normalized;            // [n, d] float32: rows / divisors (bf16_rows with divisors)
  at::Tensor values;                // [n, d] bf16: each element rounded to nearest even, subnormals flushed to zero
  std::vector<Bf16RowTerms> terms;  // per row: upper bounds of |x|, |x~ - x|, |x~|
  Bf16RowTerms max;                 // the largest of each term over the rows (0 for no rows)
};

// rows [n, d]: float32, contiguous. Flushing subnormals makes the values the same whether a unit
// treats bf16 subnormals as zero (AMX, AVX512-BF16) or not (ATen's fallback).
Bf16Rows bf16_rows(const at::Tensor& rows);

// The same for rows / divisors (divisors [n, 1] float32, row by row), whose float32 values come
// back too, in one pass: each element divided as at::div divides (IEEE division, correctly
// rounded), so they are the exact kernel's normalized rows bit for bit.
Bf16Rows bf16_rows(const at::Tensor& rows, const at::Tensor& divisors);

}  // namespace sdml::cpu_retrieval
