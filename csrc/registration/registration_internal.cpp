// Internal ops (a leading underscore): host pieces of the device kernels and parts of the CPU
// bf16 top-k, exposed so that CPU tests exercise them on CPU tensors.
#include <torch/library.h>

#include <tuple>

#include "sdml/duplicate_hash.h"
#include "sdml/topk_precision.h"

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
  // The CPU bf16 top-k's parts (sdml/topk_precision.h): the bf16 copy of float32 rows and their
  // rounding terms [n, 3] (norm, err, norm_bf16); the model of the exact kernel's GEMM.
  m.def("_bf16_rows(Tensor x) -> (Tensor values, Tensor terms)");
  m.def("_exact_dots(Tensor q, Tensor g, Tensor idx, int chunk) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdml, CompositeExplicitAutograd, m) {
  m.impl("_duplicate_rows_hashed", &duplicate_rows_hashed_op);
}

TORCH_LIBRARY_IMPL(sdml, CPU, m) {
  m.impl("_bf16_rows", &sdml::cpu_bf16_rows);
  m.impl("_exact_dots", &sdml::cpu_exact_dots);
}
