// The sdml_ext._C Python module. Loading it runs the static op registrations (schemas in
// registration.cpp, kernels in csrc/); the module itself only reports how it was built.
#include <pybind11/pybind11.h>

#include <string>

#include "sdml/host_buffers.h"

namespace py = pybind11;

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
}
