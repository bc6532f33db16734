#pragma once
// The exact mode's ranking of a query's re-scored candidates (higher score first, equal scores by
// ascending gallery index) as integer keys, and their sort: cheaper than comparing (score, index)
// pairs, and a radix sort where a query has many candidates (the bf16 top-k, topk_bf16.cpp).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sdml::cpu_retrieval {

// A candidate's place in the exact mode's order, as one integer (ascending = higher score first,
// then lower gallery index): the score's order bits above the candidate's position in its
// ascending index list. -0 counts as +0, as float comparison does.
inline uint64_t rank_key(float score, int64_t position) {
  uint32_t u;
  std::memcpy(&u, &score, sizeof u);
  if ((u & 0x7FFFFFFFu) == 0) u = 0;
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(~ordered) << 32) | uint64_t(position);
}

// Sorts keys ascending: a radix sort by bytes, least significant first, over the bytes that
// differ between keys (a query's candidate scores share their leading bytes), for many keys; a
// comparison sort of the k best for few.
inline void sort_keys(std::vector<uint64_t>& keys, int64_t k, std::vector<uint64_t>& tmp) {
  const size_t n = keys.size();
  if (n < 512) {
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
    std::sort(keys.begin(), keys.begin() + k);
    return;
  }
  uint64_t all_or = 0, all_and = ~uint64_t(0);
  for (const uint64_t key : keys) all_or |= key, all_and &= key;
  const uint64_t varying = all_or ^ all_and;
  tmp.resize(n);
  for (int b = 0; b < 8; ++b) {
    const int shift = 8 * b;
    if (((varying >> shift) & 0xFF) == 0) continue;
    uint32_t count[256] = {};
    for (const uint64_t key : keys) ++count[(key >> shift) & 0xFF];
    uint32_t offset = 0;
    for (uint32_t& c : count) {
      const uint32_t here = c;
      c = offset;
      offset += here;
    }
    for (const uint64_t key : keys) tmp[count[(key >> shift) & 0xFF]++] = key;
    keys.swap(tmp);
  }
}

}  // namespace sdml::cpu_retrieval
