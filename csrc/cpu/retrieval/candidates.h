#pragma once
// The candidates of one query (items that are not relevant but share a bucket with a relevant
// item, listed by count_items) compared exactly with their bucket's relevant items: each adds
// one to count[p], p = the relevant items ranked ahead of it (first(b) plus those of its bucket
// that rank ahead). Item `self` is left out.
//
// A bucket usually holds one to kUnsortedBucket relevant items, in any order: those are all
// compared, without a branch (16 candidates at a time on AVX-512, gathering their scores,
// buckets and the relevant items' scores and indices); a crowded bucket is sorted
// (RelevantIndex) and binary-searched.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "avx512.h"
#include "relevant_index.h"

namespace sdml::cpu_retrieval {

// p for candidate t (score v, bucket b): first(b) + the relevant items of b ranked ahead of it.
template <typename T>
inline int32_t relevant_ahead(const RelevantIndex<T>& index, int32_t b, T v, int32_t t) {
  const T* value = index.values();
  const int32_t* idx = index.indices();
  const int32_t first = index.first(b), len = index.end(b) - first;
  if (len <= kUnsortedBucket) {  // the index has slack past its end
    int32_t p = first;
    for (int j = 0; j < kUnsortedBucket; ++j) p += (j < len) & ranks_ahead(value[first + j], idx[first + j], v, t);
    return p;
  }
  int32_t lo = first, hi = first + len;  // sorted: the first relevant item not ahead of t
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (ranks_ahead(value[mid], idx[mid], v, t)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T>
void count_candidates_portable(const T* s, const int32_t* cand, int64_t nc, int64_t self,
                               const RelevantIndex<T>& index, int32_t* count) {
  const BucketMap<T>& map = index.map();
  for (int64_t i = 0; i < nc; ++i) {
    const int32_t t = cand[i];
    if (t == self) continue;
    const T v = s[t];
    ++count[relevant_ahead(index, map(v), v, t)];
  }
}

#if SDML_HAVE_AVX512_PATHS
SDML_AVX512 inline void count_candidates_avx512(const float* s, const int32_t* cand, int64_t nc, int64_t self,
                                                const RelevantIndex<float>& index, int32_t* count) {
  alignas(64) int32_t p[16], b[16];
  const BucketMap<float>& m = index.map();
  const int32_t* table = index.table();
  const float* value = index.values();
  const int32_t* idx = index.indices();
  const __m512 lo = _mm512_set1_ps(m.lo), hi = _mm512_set1_ps(m.hi), scale = _mm512_set1_ps(m.scale),
               top = _mm512_set1_ps(float(m.buckets - 1));
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1),
                above = _mm512_set1_epi32(m.buckets + 1), mask = _mm512_set1_epi32(~kFlag),
                vself = _mm512_set1_epi32(int32_t(self)), four = _mm512_set1_epi32(kUnsortedBucket);
  for (int64_t i = 0; i < nc; i += 16) {
    const __mmask16 valid0 = nc - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nc - i)) - 1);
    const __m512i t = _mm512_maskz_loadu_epi32(valid0, cand + i);
    const __mmask16 valid = valid0 & ~_mm512_cmpeq_epi32_mask(t, vself);
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, t, s, 4);
    const __m512 x = _mm512_maskz_min_ps(kAll, _mm512_mul_ps(_mm512_sub_ps(v, lo), scale), top);
    __m512i bv = _mm512_add_epi32(_mm512_maskz_cvttps_epi32(kAll, x), one);
    bv = _mm512_mask_mov_epi32(bv, _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), zero);
    bv = _mm512_mask_mov_epi32(bv, _mm512_cmp_ps_mask(v, hi, _CMP_GT_OQ), above);
    // Candidates lie in flagged buckets, b >= 1.
    const __m512i bsafe = _mm512_mask_mov_epi32(one, valid, bv);
    const __m512i first = _mm512_and_si512(_mm512_mask_i32gather_epi32(zero, kAll, bsafe, table, 4), mask);
    const __m512i end = _mm512_and_si512(_mm512_mask_i32gather_epi32(zero, kAll, _mm512_sub_epi32(bsafe, one), table, 4), mask);
    const __m512i len = _mm512_sub_epi32(end, first);
    __m512i pv = first;
    for (int j = 0; j < kUnsortedBucket; ++j) {
      const __mmask16 in = valid & _mm512_cmpgt_epi32_mask(len, _mm512_set1_epi32(j));
      if (!in) break;
      const __m512i at = _mm512_add_epi32(first, _mm512_set1_epi32(j));
      const __m512 rv = _mm512_mask_i32gather_ps(v, in, at, value, 4);
      const __m512i ri = _mm512_mask_i32gather_epi32(t, in, at, idx, 4);
      const __mmask16 ahead = _mm512_cmp_ps_mask(rv, v, _CMP_GT_OQ) |
                              (_mm512_cmp_ps_mask(rv, v, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(ri, t));
      pv = _mm512_mask_add_epi32(pv, in & ahead, pv, one);
    }
    _mm512_store_si512(p, pv);
    __mmask16 crowded = valid & _mm512_cmpgt_epi32_mask(len, four);
    if (crowded) {  // more relevant items in the bucket than the unrolled compares: searched
      _mm512_store_si512(b, bv);
      alignas(64) int32_t tt[16];
      alignas(64) float vv[16];
      _mm512_store_si512(tt, t);
      _mm512_store_ps(vv, v);
      for (; crowded; crowded &= crowded - 1) {
        const int k = __builtin_ctz(crowded);
        p[k] = relevant_ahead(index, b[k], vv[k], tt[k]);
      }
    }
    for (__mmask16 live = valid; live; live &= live - 1) ++count[p[__builtin_ctz(live)]];
  }
}
#endif

// count_candidates: the AVX-512 pass for float32 scores where the index took its AVX-512 path.
template <typename T>
void count_candidates(const T* s, const int32_t* cand, int64_t nc, int64_t self, const RelevantIndex<T>& index,
                      bool avx512, int32_t* count) {
#if SDML_HAVE_AVX512_PATHS
  if constexpr (std::is_same_v<T, float>) {
    if (avx512) return count_candidates_avx512(s, cand, nc, self, index, count);
  }
#endif
  count_candidates_portable(s, cand, nc, self, index, count);
}

}  // namespace sdml::cpu_retrieval
