#pragma once
// Large CPU kernel outputs (gradients as big as the input) from a small process-wide cache.
//
// Why: on the 2-core CPU machines this was measured on, a fresh 64 MiB tensor costs ~16k page
// faults, which take longer than the kernel that fills it (18.7 ms to write a fresh 64 MiB
// tensor vs 2.8 ms for a reused one). Blocks are 2 MiB aligned and advised
// for transparent huge pages, and freed blocks are kept for the next call (bounded).
#include <cstddef>
#include <ATen/core/Tensor.h>

namespace sdml {

// An uninitialized CPU tensor; small ones come from torch's allocator as usual.
at::Tensor empty_large_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns the cached blocks to the system; the number of bytes released.
size_t release_cached_host_buffers();

}  // namespace sdml
