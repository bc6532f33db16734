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
#include <limits>
#include <utility>
#include <vector>

#include "sdml/macros.h"

namespace sdml::cpu_retrieval {

// Ranking buckets: about one item per bucket (few items share a relevant item's bucket), at
// most kMaxBuckets (the counts and flags within a share of the L2 cache).
constexpr int64_t kItemsPerBucket = 1;
constexpr int64_t kMaxBuckets = int64_t{1} << 16;

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
class RelevantRanker {
  using Key = typename RankKey<T>::type;

 public:
  explicit RelevantRanker(int64_t n)
      : n_(n), buckets_(bucket_count(n)), count_(buckets_, 0), flag_(buckets_, 0), flag_bits_(buckets_ / 64, 0),
        slot_(buckets_), is_relevant_(n, 0), cand_(n) {}

  // Ranks (1-based, ascending) of the relevant items `rel` (gallery indices, not containing
  // `self`) in the ranking of scores s[0, n) that leaves out item `self` (-1: none).
  //
  // Every item is counted in its bucket; only the items sharing a bucket with a relevant item
  // (the candidates, found without a branch) are compared exactly. Each bucket keeps the keys of
  // up to two relevant items, which every candidate of the bucket is compared with (an empty slot
  // holds a key no item beats); buckets with three or more relevant items ("crowded", rare unless
  // scores tie massively) set their candidates aside to be sorted.
  const std::vector<int64_t>& rank(const T* s, const std::vector<int64_t>& rel, int64_t self) {
    ranks_.resize(rel.size() + 1);  // + 1: read_ranks' slack
    if (rel.empty()) {
      ranks_.clear();
      return ranks_;
    }
    const auto [lo, hi] = min_max(s, n_);
    lo_ = lo;
    scale_ = hi > lo ? T(buckets_) / (hi - lo) : T(0);
    seat_relevant(s, rel);
    const int64_t candidates = count_items(s, self);
    compare_candidates(s, candidates, self);
    read_ranks();
    for (const int64_t t : rel) is_relevant_[t] = 0;
    ranks_.pop_back();
    return ranks_;
  }

 private:
  // The bucket of a score: the same arithmetic as assign_buckets (IEEE operations give the same
  // result in its vectorized clones).
  int32_t bucket_of(T v) const {
    const int32_t b = int32_t((v - lo_) * scale_);
    const int32_t last = int32_t(buckets_ - 1);
    return b < last ? b : last;
  }

  // Phase 1: the relevant items take the slots of their buckets (all empty on entry: the
  // previous call's read_ranks reset them); a third one makes the bucket crowded.
  void seat_relevant(const T* s, const std::vector<int64_t>& rel) {
    for (const int64_t t : rel) {
      const int32_t b = bucket_of(s[t]);
      Slot& home = slot_[b];
      is_relevant_[t] = 1;
      flag_[b] = 1;
      flag_bits_[b >> 6] |= uint64_t{1} << (b & 63);
      if (home.relevant < 2) {
        home.key[home.relevant] = RankKey<T>::make(s[t], t);
      } else {
        home.key[0] = home.key[1] = RankKey<T>::kTop;
      }
      ++home.relevant;
    }
  }

  // Phase 2: one pass over all items: the histogram, and the candidates (items whose bucket
  // holds a relevant item) compacted without a branch. `self` is left out of the counts.
  int64_t count_items(const T* s, int64_t self) {
    constexpr int64_t kChunk = 256;
    int32_t b[kChunk];
    int32_t* count = count_.data();
    const uint8_t* flag = flag_.data();
    Candidate* cand = cand_.data();
    int64_t nc = 0;
    for (int64_t t0 = 0; t0 < n_; t0 += kChunk) {
      const int64_t len = std::min(kChunk, n_ - t0);
      assign_buckets(s + t0, len, lo_, scale_, int32_t(buckets_ - 1), b);
      for (int64_t j = 0; j < len; ++j) {
        const int32_t c = b[j];
        ++count[c];
        cand[nc] = {t0 + j, c};
        nc += flag[c];
      }
    }
    if (self >= 0) --count[bucket_of(s[self])];
    return nc;
  }

  // Phase 3: each candidate compared with the slots of its bucket; the candidates of crowded
  // buckets set aside, sorted.
  void compare_candidates(const T* s, int64_t nc, int64_t self) {
    crowded_.clear();
    for (int64_t i = 0; i < nc; ++i) {
      const Candidate c = cand_[i];
      if (c.index == self) continue;
      Slot& home = slot_[c.bucket];
      const Key key = RankKey<T>::make(s[c.index], c.index);
      home.ahead[0] += key > home.key[0];
      home.ahead[1] += key > home.key[1];
      if (home.relevant > 2) crowded_.push_back({c.bucket, key, c.index});  // rare
    }
    std::sort(crowded_.begin(), crowded_.end());
  }

  // Phase 4: buckets from the top: rank = 1 + items in higher buckets + items ahead in the
  // bucket. The buckets are walked 64 at a time (a word of flag_bits_): a word without relevant
  // items only adds its counts; one with relevant items gets its suffix sums in one fixed pass.
  // Counts, flags and slots are reset for the next call.
  void read_ranks() {
    int64_t above = 0, j = 0;
    int64_t* ranks = ranks_.data();
    auto crowded = crowded_.cbegin();
    int32_t higher[64];  // higher[i]: items in buckets i + 1 .. 63 of the word
    for (int64_t w = int64_t(flag_bits_.size()) - 1; w >= 0; --w) {
      int32_t* c = count_.data() + w * 64;
      uint64_t bits = flag_bits_[w];
      int32_t in_word = 0;
      if (!bits) {
        for (int i = 0; i < 64; ++i) in_word += c[i];
      } else {
        for (int i = 63; i >= 0; --i) {
          higher[i] = in_word;
          in_word += c[i];
        }
        flag_bits_[w] = 0;
      }
      while (bits) {
        const int bit = 63 - __builtin_clzll(bits);
        bits &= ~(uint64_t{1} << bit);
        const int32_t b = int32_t(w * 64 + bit);
        Slot& home = slot_[b];
        const int64_t base = 1 + above + higher[bit];
        if (home.relevant > 2) {
          for (int64_t place = 0; crowded != crowded_.cend() && crowded->bucket == b; ++crowded, ++place)
            if (is_relevant_[crowded->index]) ranks[j++] = base + place;
        } else {
          // One or two relevant items: both written, j advanced by their number (ranks_ has
          // one element of slack).
          const int64_t first = base + home.ahead[0];
          const int64_t second = home.relevant > 1 ? base + home.ahead[1] : std::numeric_limits<int64_t>::max();
          ranks[j] = std::min(first, second);
          ranks[j + 1] = std::max(first, second);
          j += home.relevant;
        }
        home = Slot{};
        flag_[b] = 0;
      }
      above += in_word;
      std::fill(c, c + 64, 0);
    }
  }

  struct Slot {
    int32_t relevant = 0;            // relevant items in the bucket
    int32_t ahead[2] = {0, 0};       // items ranking ahead of each slot's relevant item
    Key key[2] = {RankKey<T>::kTop, RankKey<T>::kTop};  // the slots' relevant items
  };

  struct Candidate {
    int64_t index;
    int32_t bucket;
  };

  // An item of a crowded bucket; sorts by bucket (highest first), then ranking order.
  struct Crowded {
    int32_t bucket;
    Key key;
    int64_t index;
    bool operator<(const Crowded& o) const { return bucket != o.bucket ? bucket > o.bucket : key > o.key; }
  };

  // A power of two, at least 64, about n / kItemsPerBucket, at most kMaxBuckets.
  static int64_t bucket_count(int64_t n) {
    int64_t b = 64;
    while (b * kItemsPerBucket < n && b < kMaxBuckets) b <<= 1;
    return b;
  }

  int64_t n_, buckets_;
  T lo_ = 0, scale_ = 0;
  std::vector<int32_t> count_;       // items per bucket
  std::vector<uint8_t> flag_;        // buckets holding a relevant item
  std::vector<uint64_t> flag_bits_;  // the same, 64 buckets a word
  std::vector<Slot> slot_;
  std::vector<uint8_t> is_relevant_;
  std::vector<Candidate> cand_;
  std::vector<Crowded> crowded_;
  std::vector<int64_t> ranks_;
};

}  // namespace sdml::cpu_retrieval
