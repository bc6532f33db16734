#pragma once
// Relevance: which gallery items are relevant to a query, from class ids (single-label) or
// label bits (multi-label), in the kernel form of sdml/retrieval.h's RetrievalLabels.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512.h"
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

// Multi-label: gallery items sharing at least one class bit with the query. A pass over all
// gallery items per query (as long as the ranking's own pass for multi-label data): 8 items a step
// on AVX-512 for one or two label words (up to 128 classes), else one item a step.
class LabelBitsRelevance {
 public:
  LabelBitsRelevance(const at::Tensor& query, const at::Tensor& gallery)
      : query_(reinterpret_cast<const uint64_t*>(query.const_data_ptr<int64_t>())),
        gallery_(reinterpret_cast<const uint64_t*>(gallery.const_data_ptr<int64_t>())),
        words_(query.size(1)),
        rows_(gallery.size(0)),
        avx512_(use_avx512()) {}

  void collect(int64_t qi, int64_t self, std::vector<int64_t>& out) const {
    const uint64_t* q = query_ + qi * words_;
    // The hits are compacted into a buffer of all rows (+ 8: the vector steps write whole
    // vectors) kept by the thread, then copied: growing `out` to all rows for every query would
    // zero-fill it each time.
    thread_local std::vector<int64_t> hits;
    if (int64_t(hits.size()) < rows_ + 8) hits.resize(rows_ + 8);
    int64_t* h = hits.data();
    int64_t n = 0;
#if SDML_HAVE_AVX512_PATHS
    if (avx512_ && words_ <= 2) {
      n = collect_avx512(q, h);
    } else
#endif
    if (words_ == 1) {
      const uint64_t q0 = q[0];
      for (int64_t t = 0; t < rows_; ++t) {  // branch-free compaction
        h[n] = t;
        n += (gallery_[t] & q0) != 0;
      }
    } else {
      for (int64_t t = 0; t < rows_; ++t) {
        uint64_t any = 0;
        for (int64_t w = 0; w < words_; ++w) any |= gallery_[t * words_ + w] & q[w];
        h[n] = t;
        n += any != 0;
      }
    }
    out.assign(h, h + n);
    if (self >= 0) out.erase(std::remove(out.begin(), out.end(), self), out.end());
  }

 private:
#if SDML_HAVE_AVX512_PATHS
  // One or two label words: the items of each step that share a bit, compressed into out.
  SDML_AVX512 int64_t collect_avx512(const uint64_t* q, int64_t* out) const {
    const __m512i step = _mm512_set1_epi64(8);
    __m512i t = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    int64_t n = 0, t0 = 0;
    if (words_ == 1) {
      const __m512i q0 = _mm512_set1_epi64(int64_t(q[0]));
      for (; t0 < rows_; t0 += 8, t = _mm512_add_epi64(t, step)) {
        const __mmask8 valid = rows_ - t0 >= 8 ? __mmask8(0xFF) : __mmask8((1u << (rows_ - t0)) - 1);
        const __m512i g = _mm512_maskz_loadu_epi64(valid, gallery_ + t0);
        const __mmask8 hit = _mm512_test_epi64_mask(g, q0);
        _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi64(hit, t));
        n += __builtin_popcount(hit);
      }
    } else {  // two words an item: items t0 .. t0 + 3 in the first load, t0 + 4 .. t0 + 7 in the second
      const __m512i qq = _mm512_set_epi64(int64_t(q[1]), int64_t(q[0]), int64_t(q[1]), int64_t(q[0]), int64_t(q[1]),
                                          int64_t(q[0]), int64_t(q[1]), int64_t(q[0]));
      const __m512i even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
      for (; t0 < rows_; t0 += 8, t = _mm512_add_epi64(t, step)) {
        const int64_t left = 2 * (rows_ - t0);  // words left
        const __mmask8 valid_lo = left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1);
        const __mmask8 valid_hi = left >= 16 ? __mmask8(0xFF) : left <= 8 ? __mmask8(0) : __mmask8((1u << (left - 8)) - 1);
        __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi64(valid_lo, gallery_ + 2 * t0), qq);
        __m512i b = _mm512_and_si512(_mm512_maskz_loadu_epi64(valid_hi, gallery_ + 2 * t0 + 8), qq);
        a = _mm512_or_si512(a, _mm512_maskz_shuffle_epi32(kAll, a, _MM_PERM_BADC));  // both words of an item OR-ed
        b = _mm512_or_si512(b, _mm512_maskz_shuffle_epi32(kAll, b, _MM_PERM_BADC));
        const __m512i any = _mm512_permutex2var_epi64(a, even, b);  // lane i: item t0 + i
        const __mmask8 hit = _mm512_test_epi64_mask(any, any);
        _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi64(hit, t));
        n += __builtin_popcount(hit);
      }
    }
    return n;
  }
#endif

  const uint64_t* query_;
  const uint64_t* gallery_;
  int64_t words_, rows_;
  bool avx512_;
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
