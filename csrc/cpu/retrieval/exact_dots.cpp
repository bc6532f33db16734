#include "exact_dots.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#include "avx512.h"
#include "sdml/cpu_blas.h"

namespace sdml::cpu_retrieval {
namespace {

// The model for one pair, plainly: the reference the vector kernels and the probe compare with.
float model_dot(const float* q, const float* x, int64_t d, int64_t chunk) {
  float total = 0;
  for (int64_t c0 = 0; c0 < d; c0 += chunk) {
    float acc = 0;
    for (int64_t k = c0; k < std::min(d, c0 + chunk); ++k) acc = std::fma(q[k], x[k], acc);
    total = c0 == 0 ? acc : total + acc;
  }
  return total;
}

// Portable kernel: the lanes of a group as independent chains (std::fma: one rounding).
void dot_group_portable(const DotGroup& grp, const float* g, int64_t d, int64_t chunk) {
  for (int64_t c = 0; c < grp.n; ++c) grp.out[c] = model_dot(grp.q, g + grp.idx[c] * d, d, chunk);
}

#if SDML_HAVE_AVX512_PATHS
// Coordinates k0 .. k0 + 15 of 16 rows, transposed: out[k][lane] = rows[lane][k0 + k]. Each
// vector is assembled from four rows' 4-coordinate pieces (a load and three inserts from memory,
// which run beside the shuffles), then a 4 x 4 transpose within each 128-bit lane.
SDML_AVX512 inline void load_transposed(const float* const* rows, int64_t k0, __m512 out[16]) {
  for (int quad = 0; quad < 4; ++quad) {
    __m512 t[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t k = k0 + 4 * quad;
      __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(rows[i] + k));
      v = _mm512_insertf32x4(v, _mm_loadu_ps(rows[i + 4] + k), 1);
      v = _mm512_insertf32x4(v, _mm_loadu_ps(rows[i + 8] + k), 2);
      t[i] = _mm512_insertf32x4(v, _mm_loadu_ps(rows[i + 12] + k), 3);
    }
    // t[i], 128-bit lane L: row i + 4 L, coordinates 4 quad + 0..3
    const __m512 a0 = _mm512_maskz_unpacklo_ps(kAll, t[0], t[1]), a1 = _mm512_maskz_unpackhi_ps(kAll, t[0], t[1]);
    const __m512 a2 = _mm512_maskz_unpacklo_ps(kAll, t[2], t[3]), a3 = _mm512_maskz_unpackhi_ps(kAll, t[2], t[3]);
    const __m512d b0 = _mm512_castps_pd(a0), b1 = _mm512_castps_pd(a1);
    const __m512d b2 = _mm512_castps_pd(a2), b3 = _mm512_castps_pd(a3);
    out[4 * quad + 0] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(__mmask8(0xFF), b0, b2));
    out[4 * quad + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(__mmask8(0xFF), b0, b2));
    out[4 * quad + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(__mmask8(0xFF), b1, b3));
    out[4 * quad + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(__mmask8(0xFF), b1, b3));
  }
}

// kGroups groups at once (independent chains hide the fused multiply-add's latency), 16 lanes
// each, lane = pair: per coordinate a fused multiply-add of the query's broadcast value with the
// lanes' gallery values (16 coordinates of 16 rows loaded and transposed at a time). Lanes past a
// group's n repeat its last item and are not stored. A chunk's last < 16 coordinates continue each
// lane's chain one by one; the chunks' partial sums are added in order, as the model says.
template <int kGroups>
SDML_AVX512 void dot_groups_avx512(const DotGroup* grp, const float* g, int64_t d,
                                                            int64_t chunk) {
  const float* rows[kGroups][kDotLanes];
  __m512 total[kGroups], acc[kGroups];
  for (int j = 0; j < kGroups; ++j) {
    for (int64_t c = 0; c < kDotLanes; ++c) rows[j][c] = g + grp[j].idx[std::min(c, grp[j].n - 1)] * d;
    total[j] = _mm512_setzero_ps();
  }
  for (int64_t c0 = 0; c0 < d; c0 += chunk) {
    const int64_t c1 = std::min(d, c0 + chunk);
    for (int j = 0; j < kGroups; ++j) acc[j] = _mm512_setzero_ps();
    int64_t k0 = c0;
    for (; k0 + 16 <= c1; k0 += 16) {
      for (int j = 0; j < kGroups; ++j) {
        __m512 x[16];
        load_transposed(rows[j], k0, x);
        const float* q = grp[j].q + k0;
        for (int k = 0; k < 16; ++k) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[k]), x[k], acc[j]);
      }
    }
    if (k0 < c1) {
      for (int j = 0; j < kGroups; ++j) {
        alignas(64) float lane[kDotLanes];
        _mm512_store_ps(lane, acc[j]);
        for (int64_t c = 0; c < kDotLanes; ++c)
          for (int64_t k = k0; k < c1; ++k) lane[c] = std::fma(grp[j].q[k], rows[j][c][k], lane[c]);
        acc[j] = _mm512_load_ps(lane);
      }
    }
    for (int j = 0; j < kGroups; ++j) total[j] = c0 == 0 ? acc[j] : _mm512_add_ps(total[j], acc[j]);
  }
  for (int j = 0; j < kGroups; ++j)
    _mm512_mask_storeu_ps(grp[j].out, static_cast<__mmask16>((1u << grp[j].n) - 1), total[j]);
}

#endif

// Runs f as the exact kernel runs its tiles' GEMMs (cpu_retrieval::for_each_tile): on one thread
// of an active parallel region, or (the kernel's single worker) on the calling thread; BLAS
// single-threaded either way.
template <typename F>
void like_exact_kernel(bool parallel_region, const F& f) {
  if (!parallel_region || at::get_num_threads() < 2) {
    const SingleThreadedBlas one_thread;
    f();
    return;
  }
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SingleThreadedBlas one_thread;
    if (begin == 0) f();
  });
}

// Deterministic values in (-1, 1) of varied magnitudes (2^0 .. 2^-3), so that sums in different
// orders round differently.
void fill_probe(float* x, int64_t n, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < n; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    const float u = static_cast<float>((s >> 40) & 0xFFFFFF) / float(1 << 24) * 2 - 1;
    x[i] = std::ldexp(u, -static_cast<int>((s >> 20) & 3));
  }
}

// The calling thread's CPU seconds where the system has them (a measurement that another
// process's time slices do not inflate, as they do a wall clock's on a shared machine).
double thread_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double seconds_since(double t0) {
  return thread_seconds() - t0;
}

// Chunks to try: the whole row first, then the usual blockings, then every multiple of 8.
std::vector<int64_t> chunk_candidates(int64_t d) {
  std::vector<int64_t> c = {d};
  for (int64_t v : {512, 1024, 256, 2048, 128, 4096, 64, 32, 16, 8192})
    if (v < d) c.push_back(v);
  for (int64_t v = 8; v < d; v += 8)
    if (std::find(c.begin(), c.end(), v) == c.end()) c.push_back(v);
  return c;
}

}  // namespace

void append_dot_groups(const float* q, const int64_t* idx, int64_t n, float* out, std::vector<DotGroup>& groups) {
  for (int64_t c = 0; c < n; c += kDotLanes) groups.push_back({q, idx + c, std::min(kDotLanes, n - c), out + c});
}

void exact_dot_groups(const DotGroup* groups, int64_t count, const float* g, int64_t d, int64_t chunk) {
#if SDML_HAVE_AVX512_PATHS
  if (use_avx512()) {
    int64_t i = 0;
    for (; i + 2 <= count; i += 2) dot_groups_avx512<2>(groups + i, g, d, chunk);
    if (i < count) dot_groups_avx512<1>(groups + i, g, d, chunk);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) dot_group_portable(groups[i], g, d, chunk);
}

ExactDotProbe probe_exact_dots(CpuGemm gemm, int64_t rows, int64_t cols, int64_t d, bool parallel_region, bool timed) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, bool>;
  static std::mutex mutex;
  static std::map<Key, std::pair<bool, ExactDotProbe>> cache;  // (verified, what was found)
  const Key key{static_cast<int>(gemm), rows, cols, d, parallel_region};
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() > 4096) cache.clear();  // many shapes: probe again rather than grow
  auto& [verified, probe] = cache[key];
  if (verified && (!timed || probe.chunk == 0 || probe.gemm_s > 0)) return probe;

  const at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::empty({rows, d}, opts), b = at::empty({cols, d}, opts), out = at::empty({rows, cols}, opts);
  fill_probe(a.mutable_data_ptr<float>(), rows * d, 1 + rows * 31 + d);
  fill_probe(b.mutable_data_ptr<float>(), cols * d, 2 + cols * 37 + d);
  const float* pa = a.const_data_ptr<float>();
  const float* pb = b.const_data_ptr<float>();
  at::Tensor want;
  double gemm_s = std::numeric_limits<double>::infinity();
  const auto run_gemm = [&] {
    like_exact_kernel(parallel_region, [&] {
      const double t0 = thread_seconds();
      want = cpu_gemm_nt(gemm, a, b, out).contiguous();
      gemm_s = std::min(gemm_s, seconds_since(t0));
    });
  };
  std::vector<int64_t> all(cols);
  for (int64_t c = 0; c < cols; ++c) all[c] = c;
  std::vector<float> got(rows * cols);
  std::vector<DotGroup> groups;
  for (int64_t r = 0; r < rows; ++r) append_dot_groups(pa + r * d, all.data(), cols, got.data() + r * cols, groups);
  double dots_s = std::numeric_limits<double>::infinity();
  const auto run_dots = [&](int64_t chunk) {
    const double t0 = thread_seconds();
    exact_dot_groups(groups.data(), int64_t(groups.size()), pb, d, chunk);
    dots_s = std::min(dots_s, seconds_since(t0));
  };

  if (!verified) {
    run_gemm();
    const float* w = want.const_data_ptr<float>();
    // Chunks that reproduce a few pairs at the call's corners and middle, then every pair of the
    // call by the kernels the bf16 top-k runs (a few tries, should a chunk fit the few by chance).
    const int64_t sample_rows[] = {0, rows / 2, rows - 1}, sample_cols[] = {0, cols / 2, cols - 1};
    int tries = 0;
    for (const int64_t chunk : chunk_candidates(d)) {
      bool match = true;
      for (const int64_t r : sample_rows)
        for (const int64_t c : sample_cols) match = match && model_dot(pa + r * d, pb + c * d, d, chunk) == w[r * cols + c];
      if (!match) continue;
      run_dots(chunk);
      bool all_match = true;
      for (int64_t i = 0; i < rows * cols && all_match; ++i) all_match = got[i] == w[i];
      if (all_match) {
        probe.chunk = chunk;
        break;
      }
      if (++tries == 3) break;
    }
    verified = true;
  }
  if (timed && probe.chunk > 0) {
    // Each part at its best of three, in thread CPU seconds.
    for (int round = 0; round < 3; ++round) run_gemm(), run_dots(probe.chunk);
    const at::Tensor a16 = a.to(at::kBFloat16), b16 = b.to(at::kBFloat16);
    at::Tensor s16 = at::empty({rows, cols}, a16.options());
    double bf16_s = std::numeric_limits<double>::infinity();
    for (int round = 0; round < 3; ++round) {
      like_exact_kernel(parallel_region, [&] {
        const double t0 = thread_seconds();
        at::mm_out(s16, a16, b16.t());
        bf16_s = std::min(bf16_s, seconds_since(t0));
      });
    }
    probe.gemm_s = gemm_s, probe.dots_s = dots_s, probe.bf16_s = bf16_s;
  }
  return probe;
}

}  // namespace sdml::cpu_retrieval
