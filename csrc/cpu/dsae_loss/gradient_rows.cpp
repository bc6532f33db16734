// Gradient rows of the CPU loss kernel: ordinary or streaming stores (see gradient_rows.h).
#include "gradient_rows.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

#include "sdml/macros.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SDML_STREAM_STORES 1
#endif

namespace sdml::dsae_cpu {
namespace {

template <typename T>
SDML_CPU_CLONES void cached_row(const T* a, const T* b, T* out, T coef, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = coef * (a[i] - b[i]);
}

template <typename T>
void scalar_row(const T* a, const T* b, T* out, T coef, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = coef * (a[i] - b[i]);
}

#ifdef SDML_STREAM_STORES
// Elements written before out is aligned to `bytes` (streaming stores need aligned addresses).
template <typename T>
int64_t head_elements(const T* out, int64_t n, int64_t bytes) {
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % bytes);
  return std::min<int64_t>(n, misalign == 0 ? 0 : (bytes - misalign) / int64_t(sizeof(T)));
}

__attribute__((target("avx512f"))) void stream_row_avx512(const float* a, const float* b, float* out, float coef,
                                                           int64_t n) {
  int64_t i = head_elements(out, n, 64);
  scalar_row(a, b, out, coef, i);
  const __m512 k = _mm512_set1_ps(coef);
  for (; i + 16 <= n; i += 16)
    _mm512_stream_ps(out + i, _mm512_mul_ps(k, _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i))));
  scalar_row(a + i, b + i, out + i, coef, n - i);
}

__attribute__((target("avx512f"))) void stream_row_avx512(const double* a, const double* b, double* out, double coef,
                                                           int64_t n) {
  int64_t i = head_elements(out, n, 64);
  scalar_row(a, b, out, coef, i);
  const __m512d k = _mm512_set1_pd(coef);
  for (; i + 8 <= n; i += 8)
    _mm512_stream_pd(out + i, _mm512_mul_pd(k, _mm512_sub_pd(_mm512_loadu_pd(a + i), _mm512_loadu_pd(b + i))));
  scalar_row(a + i, b + i, out + i, coef, n - i);
}

__attribute__((target("avx"))) void stream_row_avx(const float* a, const float* b, float* out, float coef, int64_t n) {
  int64_t i = head_elements(out, n, 32);
  scalar_row(a, b, out, coef, i);
  const __m256 k = _mm256_set1_ps(coef);
  for (; i + 8 <= n; i += 8)
    _mm256_stream_ps(out + i, _mm256_mul_ps(k, _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i))));
  scalar_row(a + i, b + i, out + i, coef, n - i);
}

__attribute__((target("avx"))) void stream_row_avx(const double* a, const double* b, double* out, double coef,
                                                    int64_t n) {
  int64_t i = head_elements(out, n, 32);
  scalar_row(a, b, out, coef, i);
  const __m256d k = _mm256_set1_pd(coef);
  for (; i + 4 <= n; i += 4)
    _mm256_stream_pd(out + i, _mm256_mul_pd(k, _mm256_sub_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i))));
  scalar_row(a + i, b + i, out + i, coef, n - i);
}
#endif

enum class Isa { none, avx, avx512 };

Isa stream_isa() {
  static const Isa isa = [] {
#ifdef SDML_STREAM_STORES
    __builtin_cpu_init();  // also checks that the OS saves the vector state (XCR0)
    if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (__builtin_cpu_supports("avx")) return Isa::avx;
#endif
    return Isa::none;
  }();
  return isa;
}

template <typename T>
void row(const T* a, const T* b, T* out, T coef, int64_t n, bool stream) {
#ifdef SDML_STREAM_STORES
  if (stream) {
    switch (stream_isa()) {
      case Isa::avx512: return stream_row_avx512(a, b, out, coef, n);
      case Isa::avx: return stream_row_avx(a, b, out, coef, n);
      case Isa::none: break;
    }
  }
#endif
  cached_row(a, b, out, coef, n);
}

int override_from_env() {
  const char* v = std::getenv("SDML_LOSS_STREAM");
  if (!v || !*v) return -1;
  return std::strcmp(v, "0") == 0 ? 0 : 1;
}

// The last-level cache divided among the cores that share it (sysconf; 0 when unknown).
int64_t cache_share_bytes() {
  long llc = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
  llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (llc <= 0) llc = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  const long cores = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
  return llc > 0 ? llc / cores : 0;
}

}  // namespace

void scaled_diff_row(const float* a, const float* b, float* out, float coef, int64_t n, bool stream) {
  row(a, b, out, coef, n, stream);
}

void scaled_diff_row(const double* a, const double* b, double* out, double coef, int64_t n, bool stream) {
  row(a, b, out, coef, n, stream);
}

void stream_fence() {
#ifdef SDML_STREAM_STORES
  _mm_sfence();
#endif
}

StreamPolicy stream_policy() {
  static const StreamPolicy policy = [] {
    const Isa isa = stream_isa();
    return StreamPolicy{isa == Isa::avx512 ? "avx512" : isa == Isa::avx ? "avx" : "none", cache_share_bytes(),
                        override_from_env()};
  }();
  return policy;
}

bool stream_gradient_rows(int64_t bytes) {
  const StreamPolicy p = stream_policy();
  if (std::strcmp(p.isa, "none") == 0) return false;
  if (p.override_value >= 0) return p.override_value == 1;
  return bytes > p.cache_share_bytes;
}

}  // namespace sdml::dsae_cpu
