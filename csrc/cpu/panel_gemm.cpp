// The AVX2 + FMA similarity GEMM (sdml/panel_gemm.h): a 6 x 16 register block per call of the
// micro-kernel (12 accumulators, two panel vectors, one broadcast: 15 of the 16 ymm registers),
// the query rows in sub-blocks that stay in the L2 cache while the panels of a block pass by.
#include "sdml/panel_gemm.h"

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define SDML_PANEL_GEMM 1
#include <immintrin.h>
// The functions carry their own target, so the build stays baseline x86-64; available() guards.
#define SDML_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define SDML_PANEL_GEMM 0
#endif

namespace sdml::panel_gemm {
namespace {

// Query rows per sub-block: their rows (kSubBytes at most of the current chunk of coordinates)
// stay in L2 while a block's panels stream past them; a multiple of the micro-kernel's 6 rows.
constexpr int64_t kSubBytes = 96 << 10;
// Coordinates per pass: a panel's chunk (16 x kMaxChunk floats, 32 KiB) stays in L1 while the
// sub-block's row groups pass. Longer rows go in passes whose partial sums wait in `out` and
// come back into the accumulators: still one FMA chain per score (measured without the passes
// at d = 8,192: 76 GFLOP/s against MKL's 136; the panel alone filled the L2).
constexpr int64_t kMaxChunk = 512;

int64_t sub_rows(int64_t d) {
  const int64_t rows = kSubBytes / std::max<int64_t>(1, d * int64_t(sizeof(float)));
  return std::max(kMicroRows, rows / kMicroRows * kMicroRows);
}

#if SDML_PANEL_GEMM
// out[r][j] for r < R, j < w (w <= 16): one FMA chain per score, coordinates in order from zero.
// This call runs the chain over d coordinates, from zero (`first`) or from the partial sums in
// out. kPackedA: a is a group of pack_rows (row r's coordinate k at a[k * 6 + r]), else rows of
// stride lda. With `above` (scores_above, last pass): row r's scores are written only where one
// exceeds above[r], and hits[r * hit_stride] says whether they were.
template <int R, bool kPackedA>
SDML_AVX2_FMA void micro(const float* a, int64_t lda, const float* p, int64_t d, float* out, int64_t ldc,
                         int64_t w, bool first, const float* above, uint8_t* hits, int64_t hit_stride) {
  __m256 acc[R][2];
  // Lanes of the real columns (w < 16: the last panel of a block).
  const __m256i iota0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), iota1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i wv = _mm256_set1_epi32(int(w));
  const __m256i mask0 = _mm256_cmpgt_epi32(wv, iota0), mask1 = _mm256_cmpgt_epi32(wv, iota1);
  if (first) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  } else if (w == kPanelCols) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_loadu_ps(out + r * ldc);
      acc[r][1] = _mm256_loadu_ps(out + r * ldc + 8);
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_maskload_ps(out + r * ldc, mask0);
      acc[r][1] = _mm256_maskload_ps(out + r * ldc + 8, mask1);
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    const __m256 b0 = _mm256_loadu_ps(p + k * kPanelCols), b1 = _mm256_loadu_ps(p + k * kPanelCols + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(kPackedA ? a + k * kMicroRows + r : a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  if (above) {
    // Ordered, non-signalling: a NaN score exceeds nothing (as in the running top-k's own test).
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 t = _mm256_set1_ps(above[r]);
      const int hit = _mm256_movemask_ps(
          _mm256_or_ps(_mm256_cmp_ps(acc[r][0], t, _CMP_GT_OQ), _mm256_cmp_ps(acc[r][1], t, _CMP_GT_OQ)));
      hits[r * hit_stride] = hit != 0;
    }
  }
  if (w == kPanelCols) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      if (above && !hits[r * hit_stride]) continue;
      _mm256_storeu_ps(out + r * ldc, acc[r][0]);
      _mm256_storeu_ps(out + r * ldc + 8, acc[r][1]);
    }
    return;
  }
  // The last panel of a block: only its w real columns. (Every loop over the accumulators is
  // unrolled: an indexed one would keep them in memory.)
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    if (above && !hits[r * hit_stride]) continue;
    _mm256_maskstore_ps(out + r * ldc, mask0, acc[r][0]);
    _mm256_maskstore_ps(out + r * ldc + 8, mask1, acc[r][1]);
  }
}

// above / hits: nullptr (scores), or as scores_above; kPackedA: a as pack_rows gives it.
template <bool kPackedA>
SDML_AVX2_FMA void scores_avx2(const float* a, int64_t rows, int64_t lda, const float* packed, int64_t cols,
                               int64_t d, float* out, int64_t ldc, const float* above, uint8_t* hits) {
  // Equal chunks of at most kMaxChunk coordinates (one pass, of none, for d = 0).
  const int64_t parts = std::max<int64_t>(1, (d + kMaxChunk - 1) / kMaxChunk);
  const int64_t chunk = std::max<int64_t>(1, (d + parts - 1) / parts);
  const int64_t passes = std::max<int64_t>(1, (d + chunk - 1) / chunk);
  const int64_t sub = sub_rows(chunk), panels = (cols + kPanelCols - 1) / kPanelCols;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t k0 = pass * chunk, len = std::min(chunk, d - k0);
    const bool first = pass == 0, last = pass == passes - 1;
    for (int64_t r0 = 0; r0 < rows; r0 += sub) {
      const int64_t r1 = std::min(rows, r0 + sub);
      for (int64_t c0 = 0; c0 < cols; c0 += kPanelCols) {
        // Panel c0 / 16 starts at (c0 / 16) * 16 * d; its coordinate k0 16 * k0 further.
        const float* p = packed + c0 * d + k0 * kPanelCols;
        const int64_t w = std::min(kPanelCols, cols - c0);
        const auto at = [&](int64_t r) { return hits && last ? hits + r * panels + c0 / kPanelCols : nullptr; };
        const auto above_at = [&](int64_t r) { return above && last ? above + r : nullptr; };
        // Row r's data at coordinate k0: packed, its group starts at r * d (r a multiple of 6).
        const auto rows_at = [&](int64_t r) { return kPackedA ? a + r * d + k0 * kMicroRows : a + r * lda + k0; };
        int64_t r = r0;
        for (; r + kMicroRows <= r1; r += kMicroRows)
          micro<6, kPackedA>(rows_at(r), lda, p, len, out + r * ldc + c0, ldc, w, first, above_at(r), at(r), panels);
        const float* ar = rows_at(r);
        float* o = out + r * ldc + c0;
        switch (r1 - r) {
          case 5: micro<5, kPackedA>(ar, lda, p, len, o, ldc, w, first, above_at(r), at(r), panels); break;
          case 4: micro<4, kPackedA>(ar, lda, p, len, o, ldc, w, first, above_at(r), at(r), panels); break;
          case 3: micro<3, kPackedA>(ar, lda, p, len, o, ldc, w, first, above_at(r), at(r), panels); break;
          case 2: micro<2, kPackedA>(ar, lda, p, len, o, ldc, w, first, above_at(r), at(r), panels); break;
          case 1: micro<1, kPackedA>(ar, lda, p, len, o, ldc, w, first, above_at(r), at(r), panels); break;
          default: break;
        }
      }
    }
  }
}
#endif

}  // namespace

bool available() {
#if SDML_PANEL_GEMM
  static const bool cpu = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return cpu;
#else
  return false;
#endif
}

void pack(const float* b, int64_t ldb, const float* norms, int64_t r0, int64_t r1, int64_t n, int64_t d,
          float* packed) {
  // Panel by panel, 16 rows read side by side (each a sequential stream), coordinate-major out.
  for (int64_t p0 = r0; p0 < r1; p0 += kPanelCols) {
    float* dst = packed + p0 * d;
    const int64_t live = std::clamp<int64_t>(n - p0, 0, kPanelCols);
    for (int64_t j = 0; j < kPanelCols; ++j) {
      if (j >= live) {
        for (int64_t k = 0; k < d; ++k) dst[k * kPanelCols + j] = 0.0f;
        continue;
      }
      const float* row = b + (p0 + j) * ldb;
      if (norms) {
        const float norm = norms[p0 + j];
        for (int64_t k = 0; k < d; ++k) dst[k * kPanelCols + j] = row[k] / norm;
      } else {
        for (int64_t k = 0; k < d; ++k) dst[k * kPanelCols + j] = row[k];
      }
    }
  }
}

void scores(const float* a, int64_t rows, int64_t lda, const float* packed, int64_t cols, int64_t d, float* out,
            int64_t ldc) {
#if SDML_PANEL_GEMM
  if (rows > 0 && cols > 0) scores_avx2<false>(a, rows, lda, packed, cols, d, out, ldc, nullptr, nullptr);
#else
  (void)a, (void)rows, (void)lda, (void)packed, (void)cols, (void)d, (void)out, (void)ldc;
#endif
}

void pack_rows(const float* a, int64_t rows, int64_t lda, int64_t d, float* out) {
  for (int64_t g = 0; g < rows; g += kMicroRows) {
    float* dst = out + g * d;
    for (int64_t r = 0; r < kMicroRows; ++r) {
      if (g + r >= rows) {
        for (int64_t k = 0; k < d; ++k) dst[k * kMicroRows + r] = 0.0f;
        continue;
      }
      const float* row = a + (g + r) * lda;
      for (int64_t k = 0; k < d; ++k) dst[k * kMicroRows + r] = row[k];
    }
  }
}

void scores_above(const float* a_packed, int64_t rows, const float* packed, int64_t cols, int64_t d,
                  const float* above, float* out, int64_t ldc, uint8_t* hits) {
#if SDML_PANEL_GEMM
  if (rows > 0 && cols > 0) scores_avx2<true>(a_packed, rows, 0, packed, cols, d, out, ldc, above, hits);
#else
  (void)a_packed, (void)rows, (void)packed, (void)cols, (void)d, (void)above, (void)out, (void)ldc, (void)hits;
#endif
}

}  // namespace sdml::panel_gemm
