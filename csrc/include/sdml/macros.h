#pragma once
// Qualifiers for math shared by the CPU and CUDA paths: the same inline functions compile
// for the host (CPU kernels, CPU tests) and the device (CUDA kernels).
#if defined(__CUDACC__)
#define SDML_HD __host__ __device__ __forceinline__
#else
#define SDML_HD inline
#endif

// Runtime-dispatched vectorization for CPU hot loops (GCC/Clang function multi-versioning):
// one build runs the AVX2+FMA clone where the CPU has it and the baseline elsewhere.
#if defined(__x86_64__) && !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
#define SDML_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SDML_CPU_CLONES
#endif
