#pragma once
// The running top-k of one query (cosine_topk): the best k of the items offered so far, block by
// block, in the ranking order (higher score first, equal scores by ascending gallery index).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "sdml/macros.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sdml::cpu_retrieval {

// Order of ranked items: higher score first, equal scores by ascending gallery index.
template <typename T>
struct Scored {
  T score;
  int64_t index;
  bool operator<(const Scored& o) const { return score > o.score || (score == o.score && index < o.index); }
};

// The best k of the items offered so far, in the ranking order. Candidates beating the
// current k-th best are appended without a branch into a buffer of 2k (+ one chunk of slack);
// a full buffer is pruned back to the best k with nth_element.
template <typename T>
class RunningTopK {
  static constexpr int64_t kChunk = 16;

  // Whether any of s[0, n) exceeds `threshold`. The full chunk is tested with SSE2 compares
  // (every x86-64 CPU has them; the AVX2 clone encodes them with VEX): neither a max reduction
  // (`omp simd reduction` went through a stack array whose vector reload stalled on store
  // forwarding in every chunk) nor an OR of compares (compiled to scalar compares) vectorized.
  template <int64_t n>
  static bool any_above(const T* s, T threshold) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float>) {
      static_assert(n % 4 == 0);
      const __m128 t = _mm_set1_ps(threshold);
      __m128 hit = _mm_cmpgt_ps(_mm_loadu_ps(s), t);
      for (int64_t j = 4; j < n; j += 4) hit = _mm_or_ps(hit, _mm_cmpgt_ps(_mm_loadu_ps(s + j), t));
      return _mm_movemask_ps(hit) != 0;
    } else if constexpr (std::is_same_v<T, double>) {
      static_assert(n % 2 == 0);
      const __m128d t = _mm_set1_pd(threshold);
      __m128d hit = _mm_cmpgt_pd(_mm_loadu_pd(s), t);
      for (int64_t j = 2; j < n; j += 2) hit = _mm_or_pd(hit, _mm_cmpgt_pd(_mm_loadu_pd(s + j), t));
      return _mm_movemask_pd(hit) != 0;
    }
#endif
    return any_above(s, n, threshold);
  }
  static bool any_above(const T* s, int64_t n, T threshold) {
    int hit = 0;
    for (int64_t j = 0; j < n; ++j) hit |= int(s[j] > threshold);
    return hit != 0;
  }

 public:
  explicit RunningTopK(int64_t k) : k_(k), cand_(2 * k + kChunk) {}

  void reset() {
    size_ = 0;
    threshold_ = -std::numeric_limits<T>::infinity();
  }

  // Offers scores s[0, n) of gallery items base, base + 1, ...; `self` is never kept.
  SDML_CPU_CLONES void offer_block(const T* s, int64_t n, int64_t base, int64_t self) {
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t len = std::min(kChunk, n - t0);
      // Later items lose ties, so only a strictly higher score than the k-th best enters; most
      // chunks have none (all but the first few blocks at a small k), so this test is the loop.
      if (!(len == kChunk ? any_above<kChunk>(s + t0, threshold_) : any_above(s + t0, len, threshold_))) continue;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t index = base + t0 + j;
        cand_[size_] = {s[t0 + j], index};
        size_ += int64_t(s[t0 + j] > threshold_) & int64_t(index != self);
      }
      if (size_ >= 2 * k_) prune();
    }
  }

  // The score an item must exceed to enter now (the k-th best kept, once k are; it only rises).
  T threshold() const { return threshold_; }

  // Writes the kept items best first (min(k, offered) of them).
  void finish(T* scores, int64_t* indices) {
    prune();
    std::sort(cand_.begin(), cand_.begin() + size_);
    for (int64_t j = 0; j < size_; ++j) {
      scores[j] = cand_[j].score;
      indices[j] = cand_[j].index;
    }
  }

  // Appends the kept items (unordered) to `out`.
  void finish_into(std::vector<Scored<T>>& out) {
    prune();
    out.insert(out.end(), cand_.begin(), cand_.begin() + size_);
  }

 private:
  void prune() {
    if (size_ <= k_) return;
    std::nth_element(cand_.begin(), cand_.begin() + (k_ - 1), cand_.begin() + size_);
    size_ = k_;
    threshold_ = cand_[k_ - 1].score;
  }

  int64_t k_, size_ = 0;
  std::vector<Scored<T>> cand_;
  T threshold_ = -std::numeric_limits<T>::infinity();
};

}  // namespace sdml::cpu_retrieval
