#pragma once
// duplicate_rows() (sdml/retrieval.h) with a fast path for the common case of no duplicates, for
// device kernels: duplicate_rows() sorts the rows themselves (unique_dim, a lexicographic sort of
// the whole gallery) on every call. Here two hashes of each row's bit patterns (-0 counted as +0;
// sums of word x weight products that cannot overflow int64), sorted, show in one sort of N keys
// that no two rows are equal; only when two rows hash alike in both is the exact search run. Equal
// rows always hash alike, so the answer is duplicate_rows()'s. Compiled into every build (at::
// ops only), so CPU tests exercise it.
#include <ATen/core/Tensor.h>

#include "sdml/retrieval.h"

namespace sdml {

DuplicateRows duplicate_rows_hashed(const at::Tensor& gallery);

}  // namespace sdml
