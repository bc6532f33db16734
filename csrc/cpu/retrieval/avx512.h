#pragma once
// Whether the ranking kernels take their AVX-512 paths: on x86-64 CPUs with AVX-512 F/BW/DQ/VL,
// compiled by GCC or Clang (the functions carry their own target attribute, so the build stays
// baseline x86-64), unless SDML_CPU_AVX512=off asks for the portable code (read when a ranker is
// made: tests compare both paths in one process). Both paths give the same results: they compute
// the same integer counts.
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define SDML_HAVE_AVX512_PATHS 1
#include <immintrin.h>
#define SDML_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#else
#define SDML_HAVE_AVX512_PATHS 0
#endif

namespace sdml::cpu_retrieval {

#if SDML_HAVE_AVX512_PATHS
// All 16 lanes: the kernels call the masked forms of intrinsics whose plain forms start from an
// undefined vector (GCC 12 warns about those: -Wmaybe-uninitialized).
constexpr __mmask16 kAll = 0xFFFF;
#endif

inline bool use_avx512() {
#if SDML_HAVE_AVX512_PATHS
  static const bool cpu = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  const char* env = std::getenv("SDML_CPU_AVX512");
  return cpu && !(env && std::strcmp(env, "off") == 0);
#else
  return false;
#endif
}

}  // namespace sdml::cpu_retrieval
