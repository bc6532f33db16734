#pragma once
// The candidates of one query in the bf16 top-k (precision="bf16"): every item whose bf16 score
// reaches bf16_candidate_threshold(kappa, D) (sdml/topk_precision.h), kappa the k-th best bf16
// score offered so far. kappa only rises, so the threshold does and the list stays a superset of
// the final candidates; pruning it to the threshold of the current kappa keeps it short.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "sdml/macros.h"
#include "sdml/topk_precision.h"

namespace sdml::cpu_retrieval {

class MarginCandidates {
  // Items per scan chunk: a chunk whose best score is below the threshold is skipped whole.
  static constexpr int64_t kChunk = 32;

 public:
  explicit MarginCandidates(int64_t k) : k_(k) {}

  // A new query, of pair bound D.
  void reset(double D) {
    D_ = D;
    size_ = 0;
    kappa_ = threshold_ = -std::numeric_limits<float>::infinity();
    cap_ = std::max<int64_t>(4 * k_, 256);
    if (int64_t(items_.size()) < cap_ + kChunk) items_.resize(cap_ + kChunk);
  }

  // Offers bf16 scores s[0, n) (raw bits) of gallery items base, base + 1, ...; `self` is never a
  // candidate. Appends without a branch per item: a chunk's items are all written, and the count
  // advances over those that pass.
  SDML_CPU_CLONES void offer_block(const uint16_t* s, int64_t n, int64_t base, int64_t self) {
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t len = std::min(kChunk, n - t0);
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < len; ++j) m = std::max(m, to_float(s[t0 + j]));
      if (m < threshold_) continue;
      Item* out = items_.data();
      int64_t size = size_;
      const float thr = threshold_;
      for (int64_t j = 0; j < len; ++j) {
        const float v = to_float(s[t0 + j]);
        const int64_t index = base + t0 + j;
        out[size] = {v, index};
        size += int64_t(v >= thr) & int64_t(index != self);
      }
      size_ = size;
      if (size_ >= cap_) prune();
    }
  }

  // After the last block: the candidates' gallery indices, ascending.
  void finish(std::vector<int64_t>& out) {
    prune();
    out.resize(size_);
    for (int64_t i = 0; i < size_; ++i) out[i] = items_[i].index;
    std::sort(out.begin(), out.end());
  }

  // The threshold the candidates passed (after finish(): the final one).
  float threshold() const { return threshold_; }

 private:
  struct Item {
    float score;
    int64_t index;
  };

  static float to_float(uint16_t bits) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  // kappa from the list (it holds every item above the old threshold, so the k best offered),
  // then the items below the new threshold dropped; room for twice what is left.
  void prune() {
    if (size_ >= k_) {
      std::nth_element(items_.begin(), items_.begin() + (k_ - 1), items_.begin() + size_,
                       [](const Item& a, const Item& b) { return a.score > b.score; });
      kappa_ = std::max(kappa_, items_[k_ - 1].score);
      threshold_ = std::max(threshold_, bf16_candidate_threshold(kappa_, D_));
      const float thr = threshold_;
      size_ = std::partition(items_.begin(), items_.begin() + size_, [thr](const Item& it) { return it.score >= thr; }) -
              items_.begin();
    }
    cap_ = std::max(cap_, 2 * size_);
    if (int64_t(items_.size()) < cap_ + kChunk) items_.resize(cap_ + kChunk);
  }

  int64_t k_, size_ = 0, cap_ = 0;
  double D_ = 0;
  float kappa_ = -std::numeric_limits<float>::infinity(), threshold_ = -std::numeric_limits<float>::infinity();
  std::vector<Item> items_;
};

}  // namespace sdml::cpu_retrieval
