#pragma once
// Ranking metrics of one query from the ranks of its relevant gallery items, shared by the CPU
// kernel (csrc/cpu/retrieval.cpp) and the CUDA kernel (csrc/cuda/retrieval.cu).
//
// The ranking: gallery items ordered by descending cosine similarity, equal scores by ascending
// gallery index; ranks are 1-based. rel_i = 1 when item i is relevant. For the relevant items in
// rank order, the h-th one (h = 1, 2, ...) sits at rank p_h; its precision is h / p_h.
//
//   AP@k      = (1 / D) * sum_{h : p_h <= k} h / p_h,   D = r = #{h : p_h <= k}  ("retrieved")
//                                                        or D = R = all relevant  ("relevant")
//   P@K       = #{h : p_h <= K} / min(K, n)             n = number of ranked items
//   P(recall level L) = max_{h : h / R >= L} h / p_h    (interpolated precision)
//
// A query is "empty" when r = 0 for AP (no relevant item within k) and R = 0 for the curves; its
// value is then 0 (Empty::Zero) or NaN (Empty::Skip, so that means can leave it out).
#include <cmath>
#include <cstdint>
#include <limits>

#include "sdml/macros.h"

namespace sdml::retrieval {

enum class Divisor : int { Retrieved = 0, Relevant = 1 };
enum class Empty : int { Zero = 0, Skip = 1 };

// Recall levels are compared with this slack so that, e.g., 3/10 reaches the level 0.3.
constexpr double kRecallSlack = 1e-12;

SDML_HD double empty_value(Empty empty) {
  return empty == Empty::Zero ? 0.0 : std::numeric_limits<double>::quiet_NaN();
}

// The precision term of the h-th relevant item (h >= 1) at rank p.
SDML_HD double precision_term(int64_t h, int64_t p) { return double(h) / double(p); }

// AP from the sum of precision terms of the r relevant items within k (R relevant in all).
SDML_HD double average_precision_from(double sum, int64_t r, int64_t R, Divisor divisor, Empty empty) {
  if (r == 0) return empty_value(empty);
  return sum / double(divisor == Divisor::Retrieved ? r : R);
}

// P@K from the hits within the top K of n ranked items.
SDML_HD double precision_at(int64_t hits, int64_t K, int64_t n) {
  const int64_t shown = K < n ? K : n;
  return shown > 0 ? double(hits) / double(shown) : 0.0;
}

// Whether h of R relevant items reach recall level L.
SDML_HD bool reaches_recall(int64_t h, int64_t R, double level) {
  return double(h) / double(R) >= level - kRecallSlack;
}

// The first h (1 <= h <= R, R >= 1) whose recall h / R reaches level L (h = R always does),
// found from its estimate ceil(L * R) and corrected for rounding in either direction.
SDML_HD int64_t first_reaching(double level, int64_t R) {
  int64_t h = static_cast<int64_t>(ceil(level * double(R)));
  h = h < 1 ? 1 : (h > R ? R : h);
  while (h > 1 && reaches_recall(h - 1, R, level)) --h;
  while (!reaches_recall(h, R, level)) ++h;
  return h;
}

}  // namespace sdml::retrieval
