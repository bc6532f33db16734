#pragma once
// One query's relevant items, indexed for ranking every other item against them: their scores
// and indices grouped by bucket, from the top bucket down, and for any score the number of
// relevant items ranked ahead of it, exact unless the score shares a bucket with a relevant item.
//
// Scores are bucketed by a monotone map (BucketMap) over [lo, hi], the range of the relevant
// items' scores: buckets 1 .. B split it evenly, scores below lo share bucket 0 and scores above
// hi bucket B + 1, and neither of those holds a relevant item. The table gives for every bucket b
// the number of relevant items in the buckets above b, its top bit set when b itself holds
// relevant items ("flagged"): an item of an unflagged bucket has exactly that many relevant items
// ahead of it; an item of a flagged bucket b has first(b) plus those of the bucket's relevant
// items [first(b), end(b)) ahead of it that rank ahead (compared exactly: score, then index). The
// order within a bucket does not matter: the ranks of the relevant items follow from these counts
// alone (RelevantRanker), except in crowded buckets (more than kUnsortedBucket relevant items),
// which are sorted into ranking order for a binary search.
//
// Built per query in O(R + B) (R relevant items, B buckets): the relevant items' buckets are
// counted, one pass from the top bucket down turns the counts into the table (16 buckets a step on
// AVX-512), and the items are placed by bucket (a counting sort).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "sdml/macros.h"

namespace sdml::cpu_retrieval {

// Buckets: a power of two, about half the number of items (with the range taken from the
// relevant items, few other items share a bucket with one), at least 64, at most kMaxBuckets.
constexpr int64_t kMaxBuckets = int64_t{1} << 16;
constexpr int32_t kFlag = int32_t(0x80000000u);  // a table entry's bucket holds relevant items
constexpr int32_t kUnsortedBucket = 4;  // buckets with more relevant items are sorted

inline int64_t bucket_count(int64_t n) {
  int64_t b = 64;
  while (2 * b < n && b < kMaxBuckets) b <<= 1;
  return b;
}

// The monotone map of scores to buckets: s_a <= s_b implies bucket(a) <= bucket(b). The same IEEE
// operations in every copy (scalar, assign_buckets' clones, AVX-512) give the same buckets.
template <typename T>
struct BucketMap {
  T lo = 0, hi = 0, scale = 0;
  int32_t buckets = 1;  // B

  BucketMap() = default;
  BucketMap(T lo_, T hi_, int32_t b) : lo(lo_), hi(hi_), buckets(b) {
    // A range too narrow for B buckets (scale overflowing) or empty gets the largest finite
    // scale or none: fewer buckets in use, still monotone.
    scale = hi > lo ? T(b) / (hi - lo) : T(0);
    if (!(scale <= std::numeric_limits<T>::max())) scale = std::numeric_limits<T>::max();
  }

  int32_t operator()(T v) const {
    T x = (v - lo) * scale;
    x = x < T(buckets - 1) ? x : T(buckets - 1);  // a NaN (infinite v - lo) takes the top bucket
    const int32_t b = v < lo ? 0 : int32_t(x) + 1;
    return v > hi ? buckets + 1 : b;
  }
};

// out[t] = m(s[t]), vectorized.
template <typename T>
SDML_CPU_CLONES void assign_buckets(const T* s, int64_t n, BucketMap<T> m, int32_t* out) {
  const T lo = m.lo, hi = m.hi, scale = m.scale, top = T(m.buckets - 1);
  const int32_t above = m.buckets + 1;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const T v = s[t];
    T x = (v - lo) * scale;
    x = x < top ? x : top;
    const int32_t b = v < lo ? 0 : int32_t(x) + 1;
    out[t] = v > hi ? above : b;
  }
}

// Whether item (va, a) ranks ahead of item (vb, b): a higher score, or an equal one and a lower
// index (-0 equals +0). Without branches: the outcome is a coin toss in the candidates' compares.
template <typename T>
inline int32_t ranks_ahead(T va, int64_t a, T vb, int64_t b) {
  return int32_t(va > vb) | (int32_t(va == vb) & int32_t(a < b));
}

template <typename T>
class RelevantIndex {
 public:
  static constexpr int64_t kSlack = 16;  // entries past the R relevant items, readable

  RelevantIndex(int64_t n, bool avx512)
      : avx512_(avx512),
        buckets_(bucket_count(n)),
        padded_((buckets_ + 2 + 15) / 16 * 16),
        table_(padded_, 0),
        count_(padded_, 0),
        relevant_(n + kSlack, 0) {}

  // Indexes the relevant items `rel` (gallery indices < 2^31, ascending, at least one) of
  // scores s.
  void build(const T* s, const std::vector<int64_t>& rel) {
    const int64_t R = rel.size();
    in_value_.resize(R);
    in_bucket_.resize(R);
    value_.resize(R + kSlack);
    index_.resize(R + kSlack);
    gather_range(s, rel);
    const T* in = in_value_.data();
    int32_t* bucket = in_bucket_.data();
    assign_buckets(in, R, map_, bucket);
    // Counts per bucket; the relevance marks.
    int32_t* count = count_.data();
    crowded_.clear();
    for (int64_t i = 0; i < R; ++i) {
      if (++count[bucket[i]] == kUnsortedBucket + 1) crowded_.push_back(bucket[i]);
      relevant_[rel[i]] = 1;
    }
    fill_table();
    // Placed by bucket (count_ back to zero).
    const int32_t* table = table_.data();
    T* value = value_.data();
    int32_t* index = index_.data();
    for (int64_t i = 0; i < R; ++i) {
      const int32_t b = bucket[i];
      const int32_t pos = (table[b - 1] & ~kFlag) - count[b]--;
      value[pos] = in[i];
      index[pos] = int32_t(rel[i]);
    }
    for (const int32_t b : crowded_) sort_bucket(b);
    std::fill(value + R, value + R + kSlack, T(0));
    std::fill(index + R, index + R + kSlack, 0);
  }

  // Undoes build()'s marks (call with the same rel before the next build).
  void release(const std::vector<int64_t>& rel) {
    for (const int64_t t : rel) relevant_[t] = 0;
  }

  const BucketMap<T>& map() const { return map_; }
  // table()[b], b in [0, B + 1]: relevant items in the buckets above b, | kFlag when b holds some.
  const int32_t* table() const { return table_.data(); }
  // The relevant items' scores and indices, grouped by bucket from the top (then kSlack zeros).
  const T* values() const { return value_.data(); }
  const int32_t* indices() const { return index_.data(); }
  // relevant()[t]: 1 for the relevant items, else 0 (n + kSlack entries).
  const uint8_t* relevant() const { return relevant_.data(); }
  int32_t first(int32_t b) const { return table_[b] & ~kFlag; }
  int32_t end(int32_t b) const { return table_[b - 1] & ~kFlag; }  // b >= 1: flagged buckets

 private:
  // in_value_ = s[rel]; the map over their range.
  void gather_range(const T* s, const std::vector<int64_t>& rel) {
    const int64_t R = rel.size();
    T* in = in_value_.data();
    T lo, hi;
#if SDML_HAVE_AVX512_PATHS
    if constexpr (std::is_same_v<T, float>) {
      if (avx512_) {
        gather_range_avx512(s, rel.data(), R, in, lo, hi);
        map_ = BucketMap<T>(lo, hi, int32_t(buckets_));
        return;
      }
    }
#endif
    lo = hi = s[rel[0]];
    for (int64_t i = 0; i < R; ++i) {
      const T v = s[rel[i]];
      in[i] = v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    map_ = BucketMap<T>(lo, hi, int32_t(buckets_));
  }

#if SDML_HAVE_AVX512_PATHS
  SDML_AVX512 static void gather_range_avx512(const float* s, const int64_t* rel, int64_t R, float* in, float& lo,
                                              float& hi) {
    __m256 vlo = _mm256_set1_ps(s[rel[0]]), vhi = vlo;
    int64_t i = 0;
    for (; i + 8 <= R; i += 8) {
      const __m256 v = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), 0xFF, _mm512_loadu_si512(rel + i), s, 4);
      _mm256_storeu_ps(in + i, v);
      vlo = _mm256_min_ps(vlo, v);
      vhi = _mm256_max_ps(vhi, v);
    }
    alignas(32) float l[8], h[8];
    _mm256_store_ps(l, vlo);
    _mm256_store_ps(h, vhi);
    lo = l[0], hi = h[0];
    for (int k = 1; k < 8; ++k) lo = l[k] < lo ? l[k] : lo, hi = h[k] > hi ? h[k] : hi;
    for (; i < R; ++i) {
      const float v = s[rel[i]];
      in[i] = v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
  }
#endif

  // Sorts the relevant items of bucket b into ranking order.
  void sort_bucket(int32_t b) {
    const int32_t first = this->first(b), end = this->end(b);
    order_.resize(end - first);
    for (int32_t j = first; j < end; ++j) order_[j - first] = {value_[j], index_[j]};
    std::sort(order_.begin(), order_.end(),
              [](const Item& a, const Item& c) { return ranks_ahead(a.value, a.index, c.value, c.index); });
    for (int32_t j = first; j < end; ++j) value_[j] = order_[j - first].value, index_[j] = order_[j - first].index;
  }

  // table[b] = sum of count[b' > b], | kFlag where count[b] > 0, from the top bucket down.
  void fill_table() {
#if SDML_HAVE_AVX512_PATHS
    if (avx512_) return fill_table_avx512(count_.data(), table_.data(), padded_);
#endif
    int32_t run = 0;
    for (int64_t b = padded_ - 1; b >= 0; --b) {
      const int32_t c = count_[b];
      table_[b] = run | (c ? kFlag : 0);
      run += c;
    }
  }

#if SDML_HAVE_AVX512_PATHS
  // The same, 16 buckets a step: suffix sums within the vector (shifts by 1, 2, 4, 8 lanes), plus
  // the running total of the buckets above.
  SDML_AVX512 static void fill_table_avx512(const int32_t* count, int32_t* table, int64_t n) {
    const __m512i zero = _mm512_setzero_si512(), flag = _mm512_set1_epi32(kFlag);
    __m512i run = zero;
    for (int64_t b0 = n - 16; b0 >= 0; b0 -= 16) {
      const __m512i c = _mm512_loadu_si512(count + b0);
      __m512i sum = c;  // lane j: count[b0 + j .. b0 + 15]
      sum = _mm512_add_epi32(sum, _mm512_maskz_alignr_epi32(kAll, zero, sum, 1));
      sum = _mm512_add_epi32(sum, _mm512_maskz_alignr_epi32(kAll, zero, sum, 2));
      sum = _mm512_add_epi32(sum, _mm512_maskz_alignr_epi32(kAll, zero, sum, 4));
      sum = _mm512_add_epi32(sum, _mm512_maskz_alignr_epi32(kAll, zero, sum, 8));
      __m512i t = _mm512_add_epi32(run, _mm512_sub_epi32(sum, c));
      t = _mm512_mask_or_epi32(t, _mm512_test_epi32_mask(c, c), t, flag);
      _mm512_storeu_si512(table + b0, t);
      run = _mm512_add_epi32(run, _mm512_maskz_permutexvar_epi32(kAll, zero, sum));
    }
  }
#endif

  struct Item {
    T value;
    int32_t index;
  };

  bool avx512_;
  int64_t buckets_, padded_;
  BucketMap<T> map_;
  std::vector<int32_t> table_, count_;  // count_: relevant items per bucket, zero between builds
  std::vector<uint8_t> relevant_;
  std::vector<T> in_value_, value_;  // in rel's order; grouped by bucket
  std::vector<int32_t> in_bucket_, index_;
  std::vector<int32_t> crowded_;  // buckets holding more than kUnsortedBucket relevant items
  std::vector<Item> order_;
};

}  // namespace sdml::cpu_retrieval
