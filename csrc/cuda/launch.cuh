#pragma once
// Launch hygiene shared by the CUDA kernels: dynamic shared memory beyond the 48 KiB a block
// gets by default needs an explicit opt-in (cudaFuncSetAttribute), and the opt-in limit is
// the device's, less the kernel's own static shared memory. device_limits() reads what the
// host-side plans need.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sdml::cuda {

struct DeviceLimits {
  int64_t sm_count, smem_optin, free_bytes;
};

inline DeviceLimits device_limits() {
  int device = 0, sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  size_t free_bytes = 0, total = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  return {sms, optin, static_cast<int64_t>(free_bytes)};
}

// Lets `kernel` launch with `dynamic_bytes` of dynamic shared memory: checks static + dynamic
// against the device's opt-in limit (an internal error: the host plans stay below it) and raises
// the kernel's dynamic limit when the request exceeds the default.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t dynamic_bytes) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(static_cast<int64_t>(attr.sharedSizeBytes) + dynamic_bytes <= optin,
              "sdml: a kernel needs ", attr.sharedSizeBytes, " + ", dynamic_bytes,
              " bytes of shared memory per block, more than this device's ", optin);
  if (dynamic_bytes > attr.maxDynamicSharedSizeBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_bytes)));
  }
}

}  // namespace sdml::cuda
