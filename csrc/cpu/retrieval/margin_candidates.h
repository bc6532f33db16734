#pragma once
// The candidates of one query in the bf16 top-k (precision="bf16"): every item whose bf16 score
// reaches bf16_candidate_threshold(kappa, D) (sdml/topk_precision.h), kappa the k-th best bf16
// score offered so far. kappa only rises, so the threshold does and the list stays a superset of
// the final candidates; pruning it to the threshold of the current kappa keeps it short.
//
// A guess of the final kappa (from a sample of the gallery) can start the threshold high: the list
// then holds only the items above the guess's threshold, which is all the candidates exactly when
// the guess is at most the final kappa; finish() checks that (the running kappa, a k-th best of
// items offered, has reached the guess) and says when it does not.
//
// The list is kept in offer order (ascending gallery index) without sorting: items are appended
// in that order, and pruning keeps the order. kappa comes from a radix selection on the scores'
// 16 bits (they are bf16 values), not from a comparison sort.
#include <cstdint>
#include <limits>
#include <vector>

namespace sdml::cpu_retrieval {

// The k-th largest (k <= n) of n bf16 values (raw bits).
float kth_largest_bf16(const uint16_t* bits, int64_t n, int64_t k);

class MarginCandidates {
 public:
  explicit MarginCandidates(int64_t k) : k_(k) {}

  // A new query, of pair bound D, and a guess of its final kappa (-inf: none).
  void reset(double D, float guess = -std::numeric_limits<float>::infinity());

  // Offers bf16 scores s[0, n) (raw bits) of gallery items base, base + 1, ...; `self` is never a
  // candidate. base + n <= 2^31 (the kernel checks the gallery's size).
  void offer_block(const uint16_t* s, int64_t n, int64_t base, int64_t self);

  // After the last block: the candidates' gallery indices, ascending, into out; false (out
  // untouched) if the guess was above the final kappa: the query must be searched again without.
  bool finish(std::vector<int64_t>& out);

 private:
  void offer_portable(const uint16_t* s, int64_t n, int64_t base, int64_t self);
  void offer_avx512(const uint16_t* s, int64_t n, int64_t base, int64_t self);
  void prune();
  void reserve(int64_t cap);

  int64_t k_, size_ = 0, cap_ = 0;
  double D_ = 0;
  bool avx512_ = false;  // the AVX-512 scan (avx512.h), chosen per query
  float kappa_ = -std::numeric_limits<float>::infinity(), threshold_ = -std::numeric_limits<float>::infinity();
  float guess_ = -std::numeric_limits<float>::infinity();
  std::vector<float> score_;    // [cap_ + slack]: the bf16 scores as floats
  std::vector<int32_t> index_;  // their gallery indices
};

}  // namespace sdml::cpu_retrieval
