#pragma once
// Exact duplicates of a gallery row get their first row's score.
//
// A GEMM may round the same dot product differently at different positions of its output (edge
// tiles, another code path), so an exact duplicate of a gallery row is given its first row's
// score: identical rows always tie and come in ascending index order.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "sdml/retrieval.h"

namespace sdml::cpu_retrieval {

// Gives every duplicate gallery row (see DuplicateRows) its first row's score, one block of
// gallery columns at a time: blocks come in ascending order and a first row precedes its
// duplicates, so its score is saved (per query row, in `saved` [rows, slots()]) before it is
// needed.
class DuplicateScores {
 public:
  explicit DuplicateScores(const DuplicateRows& rows) {
    const int64_t n = rows.size();
    const int64_t* dup = rows.dup.const_data_ptr<int64_t>();
    const int64_t* rep = rows.rep.const_data_ptr<int64_t>();
    firsts_.assign(rep, rep + n);
    std::sort(firsts_.begin(), firsts_.end());
    firsts_.erase(std::unique(firsts_.begin(), firsts_.end()), firsts_.end());
    dups_.resize(n);
    for (int64_t i = 0; i < n; ++i)
      dups_[i] = {dup[i], std::lower_bound(firsts_.begin(), firsts_.end(), rep[i]) - firsts_.begin()};
  }

  int64_t slots() const { return firsts_.size(); }

  // Scores s[i * stride + (t - g0)] of query rows i < rows for gallery items t in [g0, g0 + cols).
  template <typename T>
  void apply(T* s, int64_t rows, int64_t stride, int64_t g0, int64_t cols, T* saved) const {
    visit(s, rows, stride, g0, cols, saved, [](const T* saved_row, int64_t slot) { return saved_row[slot]; });
  }

  // For gallery ranges scored out of order (on different threads): as apply(), but a duplicate
  // scores -inf (it is never kept), and its first row's score is only saved, in `saved`
  // [rows, slots()] shared by all ranges (each first row lies in one range). offer_saved() then
  // offers the duplicates with their first rows' scores.
  template <typename T>
  void save_firsts_mask_dups(T* s, int64_t rows, int64_t stride, int64_t g0, int64_t cols, T* saved) const {
    visit(s, rows, stride, g0, cols, saved, [](const T*, int64_t) { return -std::numeric_limits<T>::infinity(); });
  }

  // Calls offer(score, index) for every duplicate but `self`, its score from row `saved` [slots()].
  template <typename T, typename Offer>
  void offer_saved(const T* saved, int64_t self, const Offer& offer) const {
    for (const Dup& d : dups_)
      if (d.index != self) offer(saved[d.slot], d.index);
  }

 private:
  struct Dup {
    int64_t index, slot;  // the duplicate row; the slot of its first row
    bool operator<(const Dup& o) const { return index < o.index; }
  };

  // Saves the scores of the first rows in [g0, g0 + cols) and gives each duplicate there the
  // score dup_score(saved row, its first row's slot).
  template <typename T, typename DupScore>
  void visit(T* s, int64_t rows, int64_t stride, int64_t g0, int64_t cols, T* saved, const DupScore& dup_score) const {
    if (dups_.empty()) return;
    const int64_t g1 = g0 + cols, n = slots();
    const int64_t f0 = std::lower_bound(firsts_.begin(), firsts_.end(), g0) - firsts_.begin();
    const int64_t f1 = std::lower_bound(firsts_.begin(), firsts_.end(), g1) - firsts_.begin();
    const auto d0 = std::lower_bound(dups_.begin(), dups_.end(), Dup{g0, 0});
    const auto d1 = std::lower_bound(dups_.begin(), dups_.end(), Dup{g1, 0});
    for (int64_t i = 0; i < rows; ++i) {
      T* row = s + i * stride - g0;
      for (int64_t f = f0; f < f1; ++f) saved[i * n + f] = row[firsts_[f]];
      for (auto it = d0; it != d1; ++it) row[it->index] = dup_score(saved + i * n, it->slot);
    }
  }
  std::vector<int64_t> firsts_;  // first rows that have duplicates, ascending
  std::vector<Dup> dups_;        // ascending index
};

}  // namespace sdml::cpu_retrieval
