#pragma once
// The pass over all of one query's items (RelevantRanker's main cost): each item of an unflagged
// bucket (never a relevant item: their buckets are flagged) adds one to count[i], i = the relevant
// items ranked ahead of it (RelevantIndex's table); the items of flagged buckets that are not
// relevant (the candidates) are listed, in ascending order, for exact comparison. Items below the
// relevant range are counted at R (no relevant item ranks behind them) or not at all.
//
// The histogram stays in the L1 cache (R + 2 counts, however many buckets). On AVX-512 the items
// go 16 at a time: buckets, table entries (gathered), relevance (16 bytes) and the candidates
// (compressed) in vectors; only the histogram's increments are scalar. The next row's scores,
// when given, are prefetched as this row's are read, so that its first pass finds them in the
// cache.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "avx512.h"
#include "relevant_index.h"

namespace sdml::cpu_retrieval {

constexpr int64_t kCountChunk = 256;  // items per step; 1 KB of float scores
constexpr int64_t kCandidateSlack = 16;  // cand[] needs n + kCandidateSlack entries

// Prefetches the cache lines of s[t0, t0 + len) into the L2 cache.
template <typename T>
inline void prefetch_scores(const T* s, int64_t len) {
  const char* p = reinterpret_cast<const char*>(s);
  for (int64_t off = 0; off < len * int64_t(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 2);
}

// Returns the number of candidates written to cand.
template <typename T>
int64_t count_items_portable(const T* s, int64_t n, const RelevantIndex<T>& index, int32_t* count, int32_t* cand,
                             const T* next) {
  int32_t b[kCountChunk];
  const int32_t* table = index.table();
  const uint8_t* rel = index.relevant();
  int64_t nc = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kCountChunk) {
    const int64_t len = std::min(kCountChunk, n - t0);
    if (next) prefetch_scores(next + t0, len);
    assign_buckets(s + t0, len, index.map(), b);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t t = t0 + j;
      const int32_t e = table[b[j]];
      const int32_t flagged = int32_t(uint32_t(e) >> 31);
      const int32_t relevant = rel[t];
      cand[nc] = int32_t(t);
      nc += flagged & (relevant ^ 1);
      count[e & ~kFlag] += flagged ^ 1;  // flagged (so are relevant items' buckets): += 0
    }
  }
  return nc;
}

#if SDML_HAVE_AVX512_PATHS
SDML_AVX512 inline int64_t count_items_avx512(const float* s, int64_t n, const RelevantIndex<float>& index,
                                              int32_t* count, int32_t* cand, const float* next) {
  alignas(64) int32_t h[kCountChunk + 16];
  const BucketMap<float>& m = index.map();
  const int32_t* table = index.table();
  const uint8_t* rel = index.relevant();
  const __m512 lo = _mm512_set1_ps(m.lo), hi = _mm512_set1_ps(m.hi), scale = _mm512_set1_ps(m.scale),
               top = _mm512_set1_ps(float(m.buckets - 1));
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1),
                above = _mm512_set1_epi32(m.buckets + 1),
                iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t nc = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kCountChunk) {
    const int64_t len = std::min(kCountChunk, n - t0);
    if (next) prefetch_scores(next + t0, len);
    int64_t nh = 0;
    for (int64_t j = 0; j < len; j += 16) {
      const int64_t t = t0 + j;
      const __mmask16 valid = len - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, s + t);
      const __m512 x = _mm512_maskz_min_ps(kAll, _mm512_mul_ps(_mm512_sub_ps(v, lo), scale), top);
      const __mmask16 below = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
      const __mmask16 over = _mm512_cmp_ps_mask(v, hi, _CMP_GT_OQ);
      __m512i b = _mm512_add_epi32(_mm512_maskz_cvttps_epi32(kAll, x), one);
      b = _mm512_mask_mov_epi32(b, below, zero);
      b = _mm512_mask_mov_epi32(b, over, above);
      const __m512i e = _mm512_mask_i32gather_epi32(zero, valid, b, table, 4);
      const __mmask16 flagged = _mm512_movepi32_mask(e);
      const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rel + t));  // slack past n
      const __mmask16 relevant = _mm_test_epi8_mask(r, r);
      const __mmask16 counted = valid & ~flagged & ~below;  // a relevant item's bucket is flagged
      const __mmask16 candidates = valid & flagged & ~relevant;
      _mm512_storeu_si512(h + nh, _mm512_maskz_compress_epi32(counted, e));
      nh += __builtin_popcount(counted);
      _mm512_storeu_si512(cand + nc,
                          _mm512_maskz_compress_epi32(candidates, _mm512_add_epi32(_mm512_set1_epi32(int32_t(t)), iota)));
      nc += __builtin_popcount(candidates);
    }
    for (int64_t k = 0; k < nh; ++k) ++count[h[k]];
  }
  return nc;
}
#endif

// count_items: the AVX-512 pass for float32 scores where the index took its AVX-512 path.
template <typename T>
int64_t count_items(const T* s, int64_t n, const RelevantIndex<T>& index, bool avx512, int32_t* count, int32_t* cand,
                    const T* next) {
#if SDML_HAVE_AVX512_PATHS
  if constexpr (std::is_same_v<T, float>) {
    if (avx512) return count_items_avx512(s, n, index, count, cand, next);
  }
#endif
  return count_items_portable(s, n, index, count, cand, next);
}

}  // namespace sdml::cpu_retrieval
