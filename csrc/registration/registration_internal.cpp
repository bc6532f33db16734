// Internal ops (a leading underscore): host pieces of the device kernels, exposed so that CPU
// tests exercise them on CPU tensors.
#include <torch/library.h>

#include <tuple>

#include "sdml/duplicate_hash.h"

namespace {

// The duplicate gallery rows as the CUDA metric kernels find them: (dup, rep), see
// sdml/duplicate_hash.h.
std::tuple<at::Tensor, at::Tensor> duplicate_rows_hashed_op(const at::Tensor& gallery) {
  const sdml::DuplicateRows d = sdml::duplicate_rows_hashed(gallery);
  return {d.dup, d.rep};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sdml, m) {
  m.def("_duplicate_rows_hashed(Tensor gallery) -> (Tensor dup, Tensor rep)");
}

TORCH_LIBRARY_IMPL(sdml, CompositeExplicitAutograd, m) {
  m.impl("_duplicate_rows_hashed", &duplicate_rows_hashed_op);
}
