// The sdml_ext._C Python module. Loading it runs the static op registrations (the namespace here,
// schemas in csrc/registration/<family>.cpp, kernels in csrc/); the module itself reports how it was
// built and exposes the host-side checks that the fake implementations share with the kernels.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "sdml/dsae_loss.h"
#include "sdml/host_buffers.h"

namespace py = pybind11;

// The sdml op namespace; each op family adds its schemas with TORCH_LIBRARY_FRAGMENT(sdml, m).
TORCH_LIBRARY(sdml, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdml_ext compiled kernels (ops are under torch.ops.sdml)";
  m.attr("torch_version") = std::string(SDML_TORCH_VERSION);
#ifdef SDML_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("release_cached_host_buffers", &sdml::release_cached_host_buffers,
        "Frees the CPU blocks cached for large kernel outputs; returns the bytes released.");
  m.def(
      "check_dsae_loss_cuda_limits",
      [](int64_t B, int64_t D, int64_t d, int64_t c, bool float64) {
        try {
          return sdml::check_dsae_loss_cuda_limits({B, D, d, c}, float64 ? at::kDouble : at::kFloat);
        } catch (const c10::ValueError& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("B"), py::arg("D"), py::arg("d"), py::arg("c"), py::arg("float64"),
      "Raises the ValueError the CUDA dsae_loss kernels raise for these sizes (x_hat [B, D], h [B, d], "
      "P [d, c]; float64 inputs or not), or returns the shared memory bytes a block needs. Runs "
      "without a GPU.");
}
