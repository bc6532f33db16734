#pragma once
// The exact ranks of one query's relevant items among all its scores, without a full sort.
//
// With R relevant items in ranking order, the h-th (0-based) ranks 1 + h + (the items that are
// not relevant and rank ahead of it). So every other item is counted at the number of relevant
// items ranked ahead of it (count_items: exact from RelevantIndex's table for all items but those
// sharing a bucket with a relevant item, the candidates, which are compared with their bucket's
// relevant items), and a prefix sum over these R + 1 counts gives the ranks, in ascending order. The ranking
// metrics (sdml/retrieval_math.h) follow from the ranks.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512.h"
#include "candidates.h"
#include "count_items.h"
#include "relevant_index.h"

namespace sdml::cpu_retrieval {

template <typename T>
class RelevantRanker {
 public:
  explicit RelevantRanker(int64_t n) : n_(n), avx512_(use_avx512()), index_(n, avx512_), cand_(n + kCandidateSlack) {}

  // Ranks (1-based, ascending) of the relevant items `rel` (gallery indices, ascending, not
  // containing `self`) in the ranking of scores s[0, n) that leaves out item `self` (-1: none).
  // `next`, when not null, is the next row to be ranked: prefetched meanwhile.
  const std::vector<int64_t>& rank(const T* s, const std::vector<int64_t>& rel, int64_t self,
                                   const T* next = nullptr) {
    const int64_t R = rel.size();
    ranks_.resize(R);
    if (R == 0) return ranks_;
    index_.build(s, rel);
    count_.assign(R + 2, 0);
    int32_t* count = count_.data();
    const int64_t nc = count_items(s, n_, index_, avx512_, count, cand_.data(), next);
    count_candidates(s, cand_.data(), nc, self, index_, avx512_, count);
    if (self >= 0) {  // counted above unless it is a candidate (left out there) or below the range
      const int32_t e = index_.table()[index_.map()(s[self])];
      if (e >= 0) --count[e];
    }
    int64_t ahead = 0;
    for (int64_t h = 0; h < R; ++h) {
      ahead += count[h];
      ranks_[h] = 1 + h + ahead;
    }
    index_.release(rel);
    return ranks_;
  }

 private:
  int64_t n_;
  bool avx512_;
  RelevantIndex<T> index_;
  std::vector<int32_t> count_;  // count_[i]: items not relevant with i relevant items ahead
  std::vector<int32_t> cand_;
  std::vector<int64_t> ranks_;
};

}  // namespace sdml::cpu_retrieval
