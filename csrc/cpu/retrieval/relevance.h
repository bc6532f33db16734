#pragma once
// Relevance: which gallery items are relevant to a query, from class ids (single-label) or
// label bits (multi-label), in the kernel form of sdml/retrieval.h's RetrievalLabels.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "sdml/retrieval.h"

namespace sdml::cpu_retrieval {

// Single-label: gallery items with the query's class id; -1 matches nothing.
class ClassIdRelevance {
 public:
  ClassIdRelevance(const at::Tensor& query, const at::Tensor& gallery)
      : query_(query.const_data_ptr<int64_t>()), order_(gallery.size(0)), class_of_(gallery.size(0)) {
    const int64_t* g = gallery.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < int64_t(order_.size()); ++t) order_[t] = t;
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return g[a] < g[b]; });
    for (size_t j = 0; j < order_.size(); ++j) class_of_[j] = g[order_[j]];
  }

  // The relevant gallery items of query qi (ascending), less `self`.
  void collect(int64_t qi, int64_t self, std::vector<int64_t>& out) const {
    out.clear();
    const int64_t c = query_[qi];
    if (c < 0) return;
    const auto [lo, hi] = std::equal_range(class_of_.begin(), class_of_.end(), c);
    for (auto it = lo; it != hi; ++it) {
      const int64_t t = order_[it - class_of_.begin()];
      if (t != self) out.push_back(t);
    }
  }

 private:
  const int64_t* query_;
  std::vector<int64_t> order_;     // gallery indices sorted by class id, then index
  std::vector<int64_t> class_of_;  // class id of order_[j]
};

// Multi-label: gallery items sharing at least one class bit with the query.
class LabelBitsRelevance {
 public:
  LabelBitsRelevance(const at::Tensor& query, const at::Tensor& gallery)
      : query_(reinterpret_cast<const uint64_t*>(query.const_data_ptr<int64_t>())),
        gallery_(reinterpret_cast<const uint64_t*>(gallery.const_data_ptr<int64_t>())),
        words_(query.size(1)),
        rows_(gallery.size(0)) {}

  void collect(int64_t qi, int64_t self, std::vector<int64_t>& out) const {
    const uint64_t* q = query_ + qi * words_;
    out.resize(rows_);
    int64_t n = 0;
    if (words_ == 1) {
      const uint64_t q0 = q[0];
      for (int64_t t = 0; t < rows_; ++t) {  // branch-free compaction
        out[n] = t;
        n += (gallery_[t] & q0) != 0;
      }
    } else {
      for (int64_t t = 0; t < rows_; ++t) {
        uint64_t any = 0;
        for (int64_t w = 0; w < words_; ++w) any |= gallery_[t * words_ + w] & q[w];
        out[n] = t;
        n += any != 0;
      }
    }
    out.resize(n);
    if (self >= 0) out.erase(std::remove(out.begin(), out.end(), self), out.end());
  }

 private:
  const uint64_t* query_;
  const uint64_t* gallery_;
  int64_t words_, rows_;
};

// Calls visit(relevance) with the labels' relevance rule (class ids or label bits) for queries
// with labels `query` against gallery items with labels `gallery`.
template <typename Visit>
void with_relevance(const RetrievalLabels& labels, bool swapped, const Visit& visit) {
  const at::Tensor& q = swapped ? labels.gallery : labels.query;
  const at::Tensor& g = swapped ? labels.query : labels.gallery;
  if (labels.multi_hot) {
    visit(LabelBitsRelevance(q, g));
  } else {
    visit(ClassIdRelevance(q, g));
  }
}

}  // namespace sdml::cpu_retrieval
