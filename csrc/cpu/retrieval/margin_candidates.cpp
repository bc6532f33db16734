#include "margin_candidates.h"

#include <algorithm>
#include <cstring>

#include "avx512.h"
#include "sdml/macros.h"
#include "sdml/topk_precision.h"

namespace sdml::cpu_retrieval {
namespace {

// Room past the capacity: one vector store of 16 items, or one portable chunk.
constexpr int64_t kSlack = 32;
// Items per portable scan chunk: a chunk whose best score is below the threshold is skipped whole.
constexpr int64_t kChunk = 32;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bf16 bits as a 16-bit key ordered like the value (-0 before +0, which the selection does not
// need to tell apart), and back.
inline uint32_t order_key(uint16_t bits) {
  const uint32_t b = bits;
  return (b & 0x8000u) ? (~b & 0xFFFFu) : (b | 0x8000u);
}
inline uint32_t order_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return order_key(static_cast<uint16_t>(u >> 16));  // a bf16 value: the low 16 bits are zero
}

inline float key_value(uint32_t key) {
  const uint32_t b = (key & 0x8000u) ? (key & 0x7FFFu) : (~key & 0xFFFFu);
  return bf16_to_float(static_cast<uint16_t>(b));
}

// The k-th largest of n bf16 values v[0, n) (n >= k), by two byte-wise histograms of their order
// keys. Scores crowd into a few buckets, so each histogram is kept as four interleaved copies:
// consecutive items increment different counters instead of waiting on one another.
template <typename T>
float kth_largest(const T* v, int64_t n, int64_t k) {
  uint32_t count[4][256] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int c = 0; c < 4; ++c) ++count[c][order_key(v[i + c]) >> 8];
  for (; i < n; ++i) ++count[0][order_key(v[i]) >> 8];
  const auto total = [&](uint32_t b) { return int64_t(count[0][b]) + count[1][b] + count[2][b] + count[3][b]; };
  uint32_t high = 255;
  int64_t above = 0;  // items in higher buckets
  while (above + total(high) < k) above += total(high--);
  std::memset(count, 0, sizeof count);
  for (i = 0; i + 4 <= n; i += 4)
    for (int c = 0; c < 4; ++c) {
      const uint32_t key = order_key(v[i + c]);
      count[c][key & 0xFF] += uint32_t((key >> 8) == high);
    }
  for (; i < n; ++i) {
    const uint32_t key = order_key(v[i]);
    count[0][key & 0xFF] += uint32_t((key >> 8) == high);
  }
  uint32_t low = 255;
  while (above + total(low) < k) above += total(low--);
  return key_value((high << 8) | low);
}


}  // namespace

float kth_largest_bf16(const uint16_t* bits, int64_t n, int64_t k) { return kth_largest(bits, n, k); }

void MarginCandidates::reset(double D, float guess) {
  D_ = D;
  size_ = 0;
  guess_ = guess;
  avx512_ = use_avx512();
  kappa_ = -std::numeric_limits<float>::infinity();
  threshold_ = bf16_candidate_threshold(guess, D);
  reserve(std::max<int64_t>(2 * k_, 512));
}

void MarginCandidates::reserve(int64_t cap) {
  cap_ = cap;
  if (int64_t(score_.size()) < cap_ + kSlack) {
    score_.resize(cap_ + kSlack);
    index_.resize(cap_ + kSlack);
  }
}

void MarginCandidates::offer_block(const uint16_t* s, int64_t n, int64_t base, int64_t self) {
#if SDML_HAVE_AVX512_PATHS
  if (avx512_) {
    const int64_t n16 = n / 16 * 16;
    offer_avx512(s, n16, base, self);
    offer_portable(s + n16, n - n16, base + n16, self);
    return;
  }
#endif
  offer_portable(s, n, base, self);
}

// Appends without a branch per item: a chunk's items are all written, and the count advances over
// those that pass.
SDML_CPU_CLONES void MarginCandidates::offer_portable(const uint16_t* s, int64_t n, int64_t base, int64_t self) {
  for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
    const int64_t len = std::min(kChunk, n - t0);
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = std::max(m, bf16_to_float(s[t0 + j]));
    if (m < threshold_) continue;
    const float thr = threshold_;
    int64_t size = size_;
    for (int64_t j = 0; j < len; ++j) {
      const float v = bf16_to_float(s[t0 + j]);
      const int64_t index = base + t0 + j;
      score_[size] = v;
      index_[size] = static_cast<int32_t>(index);
      size += int64_t(v >= thr) & int64_t(index != self);
    }
    size_ = size;
    if (size_ >= cap_) prune();
  }
}

#if SDML_HAVE_AVX512_PATHS
// 16 scores at a time: widened to floats, compared with the threshold, and the passing ones
// (and their indices) compressed into the list's end.
SDML_AVX512 void MarginCandidates::offer_avx512(const uint16_t* s, int64_t n, int64_t base,
                                                                        int64_t self) {
  // Locals: the stores below may alias any member, which would be reloaded after each.
  __m512 thr = _mm512_set1_ps(threshold_);
  float* score = score_.data();
  int32_t* index = index_.data();
  int64_t size = size_, cap = cap_;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i bits = _mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j))), 16);
    const __m512 v = _mm512_castsi512_ps(bits);
    __mmask16 pass = _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ);
    if (!pass) continue;
    const int64_t first = base + j;
    if (self - first >= 0 && self - first < 16) pass &= static_cast<__mmask16>(~(1u << (self - first)));
    _mm512_storeu_ps(score + size, _mm512_maskz_compress_ps(pass, v));
    _mm512_storeu_si512(index + size,
                        _mm512_maskz_compress_epi32(pass, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first)), lanes)));
    size += __builtin_popcount(pass);
    if (size >= cap) {
      size_ = size;
      prune();
      thr = _mm512_set1_ps(threshold_);
      score = score_.data(), index = index_.data();
      size = size_, cap = cap_;
    }
  }
  size_ = size;
}
#else
void MarginCandidates::offer_avx512(const uint16_t* s, int64_t n, int64_t base, int64_t self) {
  offer_portable(s, n, base, self);
}
#endif

// kappa from the list (it holds every item above the old threshold, so the k best offered), then
// the items below the new threshold dropped, in order; room for four times what is left.
void MarginCandidates::prune() {
  if (size_ >= k_) {
    kappa_ = std::max(kappa_, kth_largest(score_.data(), size_, k_));
    threshold_ = std::max(threshold_, bf16_candidate_threshold(kappa_, D_));
    const float thr = threshold_;
    int64_t kept = 0;
    for (int64_t i = 0; i < size_; ++i) {
      const float v = score_[i];
      score_[kept] = v;
      index_[kept] = index_[i];
      kept += int64_t(v >= thr);
    }
    size_ = kept;
  }
  reserve(std::max(cap_, 4 * size_));
}

bool MarginCandidates::finish(std::vector<int64_t>& out) {
  prune();
  if (size_ < k_ || kappa_ < guess_) return false;
  out.assign(index_.begin(), index_.begin() + size_);
  return true;
}

}  // namespace sdml::cpu_retrieval
