// Gradient rows of the CPU loss kernel: ordinary or streaming stores (see gradient_rows.h).
#include "gradient_rows.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include <ATen/Parallel.h>

#include "sdml/checks.h"
#include "sdml/dsae_loss.h"
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
  if (misalign % int64_t(sizeof(T)) != 0) return n;  // never aligns: all ordinary stores
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

// SDML_LOSS_STREAM: -1 when unset, else 0 or 1.
int stream_override() {
  const char* v = std::getenv("SDML_LOSS_STREAM");
  if (!v || !*v) return -1;
  SDML_CHECK_VALUE(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0,
                   "SDML_LOSS_STREAM must be 0 (ordinary stores) or 1 (streaming stores), got '", v, "'");
  return v[0] - '0';
}

// How many CPUs a sysfs CPU list names ("0-3,8,10-11" -> 7).
int64_t count_cpus(const std::string& list) {
  int64_t n = 0;
  std::stringstream in(list);
  std::string part;
  while (std::getline(in, part, ',')) {
    const auto dash = part.find('-');
    try {
      n += dash == std::string::npos ? 1 : std::stoll(part.substr(dash + 1)) - std::stoll(part.substr(0, dash)) + 1;
    } catch (const std::exception&) {
      return 0;
    }
  }
  return n;
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// The last-level cache as the OS reports it (cpu0's highest-level data or unified cache in sysfs,
// else sysconf with every online CPU sharing it); bytes 0 when unknown.
struct LastLevelCache {
  int64_t bytes = 0, sharing_cpus = 1;
};

LastLevelCache last_level_cache() {
  LastLevelCache best;
  int best_level = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level"), type = read_line(dir + "type"),
                      size = read_line(dir + "size");
    if (level.empty() || size.empty() || type == "Instruction") continue;
    int64_t bytes = 0;
    try {
      std::size_t end = 0;
      bytes = std::stoll(size, &end);
      const char unit = end < size.size() ? size[end] : ' ';
      bytes <<= unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
    } catch (const std::exception&) {
      continue;
    }
    const int lvl = std::atoi(level.c_str());
    if (lvl > best_level && bytes > 0) {
      best_level = lvl;
      best = {bytes, std::max<int64_t>(1, count_cpus(read_line(dir + "shared_cpu_list")))};
    }
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  if (best.bytes == 0) {
    long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (llc <= 0) llc = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (llc > 0) best = {llc, std::max<int64_t>(1, sysconf(_SC_NPROCESSORS_ONLN))};
  }
#endif
  return best;
}

const LastLevelCache& cache() {
  static const LastLevelCache c = last_level_cache();
  return c;
}

// The part of the last-level cache that this process's threads may count on.
int64_t available_cache_bytes() {
  const LastLevelCache& c = cache();
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, c.sharing_cpus);
  return c.bytes / c.sharing_cpus * threads;
}

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "AVX-512" : isa == Isa::avx ? "AVX" : "none"; }

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

bool stream_gradient_rows(int64_t pass_bytes) {
  if (stream_isa() == Isa::none) return false;
  const int forced = stream_override();
  if (forced >= 0) return forced == 1;
  return cache().bytes > 0 && pass_bytes > available_cache_bytes();
}

std::string stream_policy_note() {
  std::ostringstream note;
  if (stream_isa() == Isa::none) return "ordinary stores (this CPU has no AVX streaming stores)";
  const int forced = stream_override();
  if (forced >= 0) {
    note << (forced ? "streaming" : "ordinary") << " stores (SDML_LOSS_STREAM=" << forced << ")";
  } else if (cache().bytes == 0) {
    note << "ordinary stores (the last-level cache size is unknown)";
  } else {
    note << "streaming " << isa_name(stream_isa()) << " stores when a pass moves more than "
         << (available_cache_bytes() >> 20) << " MiB (last-level cache " << (cache().bytes >> 20) << " MiB shared by "
         << cache().sharing_cpus << " CPUs, " << at::get_num_threads() << " threads), else ordinary";
  }
  return note.str();
}

}  // namespace sdml::dsae_cpu

namespace sdml {
std::string dsae_loss_cpu_stores() { return dsae_cpu::stream_policy_note(); }
}  // namespace sdml
