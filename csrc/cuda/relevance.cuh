#pragma once
// Relevance of gallery item gi to query qi on the device, for the ranking-metric kernels.
#include <cstdint>

namespace sdml {

// Class ids [N] (-1 = unlabelled): relevant when the query is labelled and the classes match.
struct ClassIds {
  const int64_t* query;
  const int64_t* gallery;
  __device__ bool operator()(int64_t qi, int64_t gi) const {
    const int64_t c = query[qi];
    return c >= 0 && gallery[gi] == c;
  }
};

// Packed multi-hot rows [N, words]: relevant when they share a class.
struct LabelBits {
  const int64_t* query;
  const int64_t* gallery;
  int64_t words;
  __device__ bool operator()(int64_t qi, int64_t gi) const {
    int64_t any = 0;
    for (int64_t w = 0; w < words; ++w) any |= query[qi * words + w] & gallery[gi * words + w];
    return any != 0;
  }
};

}  // namespace sdml
