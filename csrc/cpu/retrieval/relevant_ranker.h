#pragma once
// The exact ranks of one query's relevant items among all its scores, without a full sort.
//
// The row's scores are bucketed (a monotone map of [min, max] onto buckets): an item in a higher
// bucket always scores higher, so a histogram gives each relevant item the count of items above
// its bucket, and items sharing a bucket with a relevant item are compared exactly (score, then
// ascending index) through integer rank keys. The ranking metrics (sdml/retrieval_math.h) follow
// from these ranks.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "sdml/macros.h"

namespace sdml::cpu_retrieval {

// Ranking buckets: about two items per bucket, the bucket array within a share of the L2 cache.
constexpr int64_t kItemsPerBucket = 2;
constexpr size_t kBucketBytes = 256 << 10;

// Smallest and largest of s[0, n), n >= 1.
template <typename T>
SDML_CPU_CLONES std::pair<T, T> min_max(const T* s, int64_t n) {
  T lo = s[0], hi = s[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t t = 0; t < n; ++t) {
    lo = s[t] < lo ? s[t] : lo;
    hi = s[t] > hi ? s[t] : hi;
  }
  return {lo, hi};
}

// bucket_of[t] = min(int((s[t] - lo) * scale), last): monotone, s_a <= s_b implies
// bucket_of[a] <= bucket_of[b].
template <typename T>
SDML_CPU_CLONES void assign_buckets(const T* s, int64_t n, T lo, T scale, int32_t last, int32_t* bucket_of) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const int32_t b = int32_t((s[t] - lo) * scale);
    bucket_of[t] = b < last ? b : last;
  }
}

// An integer key per ranked item that orders like the ranking: key(a) > key(b) exactly when a
// ranks ahead of b (higher score, or equal score and lower index). The high half is the score's
// bits made order-preserving (-0 counted as +0), the low half the complemented index.
template <typename T> struct RankKey;
template <> struct RankKey<float> {
  using type = uint64_t;
  static constexpr type kTop = ~type{0};  // beats every finite score
  static type make(float v, int64_t t) {
    uint32_t bits;
    v += 0.0f;
    std::memcpy(&bits, &v, sizeof bits);
    bits ^= uint32_t(int32_t(bits) >> 31) | 0x80000000u;
    return (type(bits) << 32) | uint32_t(~uint32_t(t));
  }
};
template <> struct RankKey<double> {
  using type = unsigned __int128;
  static constexpr type kTop = ~type{0};
  static type make(double v, int64_t t) {
    uint64_t bits;
    v += 0.0;
    std::memcpy(&bits, &v, sizeof bits);
    bits ^= uint64_t(int64_t(bits) >> 63) | (uint64_t{1} << 63);
    return (type(bits) << 64) | uint64_t(~uint64_t(t));
  }
};

template <typename T>
SDML_CPU_CLONES void make_keys(const T* s, int64_t n, typename RankKey<T>::type* keys) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) keys[t] = RankKey<T>::make(s[t], t);
}

template <typename T>
class RelevantRanker {
  using Key = typename RankKey<T>::type;

 public:
  explicit RelevantRanker(int64_t n)
      : n_(n), buckets_(bucket_count(n)), bucket_of_(n), keys_(n), bucket_(buckets_), is_relevant_(n, 0) {}

  // Ranks (1-based, ascending) of the relevant items `rel` (gallery indices, not containing
  // `self`) in the ranking of scores s[0, n) that leaves out item `self` (-1: none).
  //
  // Each bucket keeps the keys of up to two relevant items. Every item falling into a bucket
  // is compared with both, without a branch (an empty slot holds a key no item beats).
  // Buckets with three or more relevant items ("crowded", rare unless scores tie massively)
  // set their items aside to be sorted.
  const std::vector<int64_t>& rank(const T* s, const std::vector<int64_t>& rel, int64_t self) {
    ranks_.resize(rel.size());
    if (rel.empty()) return ranks_;
    bucket_and_key(s);
    seat_relevant(rel);
    count_items(self);
    read_ranks();
    for (const int64_t t : rel) is_relevant_[t] = 0;
    return ranks_;
  }

 private:
  // Phase 1: every item's bucket (a monotone map of [min, max] onto the buckets) and rank key.
  void bucket_and_key(const T* s) {
    const auto [lo, hi] = min_max(s, n_);
    const T scale = hi > lo ? T(buckets_) / (hi - lo) : T(0);
    assign_buckets(s, n_, lo, scale, int32_t(buckets_ - 1), bucket_of_.data());
    make_keys(s, n_, keys_.data());
  }

  // Phase 2: the relevant items take the slots of their buckets (all empty on entry: the
  // previous call's read_ranks reset them); a third one makes the bucket crowded.
  void seat_relevant(const std::vector<int64_t>& rel) {
    for (const int64_t t : rel) {
      Bucket& home = bucket_[bucket_of_[t]];
      is_relevant_[t] = 1;
      if (home.relevant < 2) {
        home.key[home.relevant] = keys_[t];
      } else {
        home.key[0] = home.key[1] = RankKey<T>::kTop;
      }
      ++home.relevant;
    }
  }

  // Phase 3: one pass over all items, `self` left out: the histogram, the exact comparisons
  // with the slots of the item's bucket, and the items of crowded buckets set aside (sorted).
  void count_items(int64_t self) {
    const int32_t* bucket_of = bucket_of_.data();
    const Key* keys = keys_.data();
    Bucket* bucket = bucket_.data();
    crowded_.clear();
    for (int64_t t = 0; t < n_; ++t) {
      Bucket& home = bucket[bucket_of[t]];
      const Key key = keys[t];
      ++home.count;
      home.ahead[0] += key > home.key[0];
      home.ahead[1] += key > home.key[1];
      if (home.relevant > 2 && t != self) crowded_.push_back({bucket_of[t], key, t});  // rare
    }
    if (self >= 0) {
      Bucket& home = bucket[bucket_of[self]];
      --home.count;
      for (int i = 0; i < 2; ++i) home.ahead[i] -= keys[self] > home.key[i];
    }
    std::sort(crowded_.begin(), crowded_.end());
  }

  // Phase 4: buckets from the top: rank = 1 + items in higher buckets + items ahead in the
  // bucket. Each bucket is reset on the way for the next call.
  void read_ranks() {
    int64_t above = 0, j = 0;
    int64_t* ranks = ranks_.data();
    auto crowded = crowded_.cbegin();
    for (int64_t b = buckets_ - 1; b >= 0; --b) {
      Bucket& home = bucket_[b];
      if (home.relevant > 2) {
        for (int64_t place = 0; crowded != crowded_.cend() && crowded->bucket == b; ++crowded, ++place)
          if (is_relevant_[crowded->index]) ranks[j++] = 1 + above + place;
      } else if (home.relevant > 0) {
        const int64_t first = 1 + above + home.ahead[0];
        if (home.relevant == 1) {
          ranks[j++] = first;
        } else {
          const int64_t second = 1 + above + home.ahead[1];
          ranks[j++] = std::min(first, second);
          ranks[j++] = std::max(first, second);
        }
      }
      above += home.count;
      home = Bucket{};
    }
  }

  struct Bucket {
    int32_t count = 0;               // items in the bucket
    int32_t relevant = 0;            // relevant items in the bucket
    int32_t ahead[2] = {0, 0};       // items ranking ahead of each slot's relevant item
    Key key[2] = {RankKey<T>::kTop, RankKey<T>::kTop};  // the slots' relevant items
  };

  // An item of a crowded bucket; sorts by bucket (highest first), then ranking order.
  struct Crowded {
    int32_t bucket;
    Key key;
    int64_t index;
    bool operator<(const Crowded& o) const { return bucket != o.bucket ? bucket > o.bucket : key > o.key; }
  };

  // A power of two, at least 64, about n / kItemsPerBucket, at most kBucketBytes of buckets.
  static int64_t bucket_count(int64_t n) {
    int64_t b = 64;
    while (b * kItemsPerBucket < n && 2 * b * sizeof(Bucket) <= kBucketBytes) b <<= 1;
    return b;
  }

  int64_t n_, buckets_;
  std::vector<int32_t> bucket_of_;
  std::vector<Key> keys_;
  std::vector<Bucket> bucket_;
  std::vector<uint8_t> is_relevant_;
  std::vector<Crowded> crowded_;
  std::vector<int64_t> ranks_;
};

}  // namespace sdml::cpu_retrieval
