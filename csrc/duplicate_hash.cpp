// duplicate_rows() with a hashed fast path (see sdml/duplicate_hash.h).
#include "sdml/duplicate_hash.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace sdml {

DuplicateRows duplicate_rows_hashed(const at::Tensor& gallery_in) {
  const at::Tensor g = gallery_in.detach().contiguous().add(0);  // -0 + 0 = +0
  const int64_t n = g.size(0);
  if (n < 2 || g.size(1) == 0) return duplicate_rows(gallery_in);
  // The rows' bits as non-negative words below 2^32 (64-bit values as two words).
  at::Tensor words;
  switch (g.element_size()) {
    case 2: words = g.view(at::kShort).to(at::kLong).bitwise_and(0xFFFF); break;
    case 4: words = g.view(at::kInt).to(at::kLong).bitwise_and(0xFFFFFFFFLL); break;
    default: {
      const at::Tensor w = g.view(at::kLong);
      words = at::cat({w.bitwise_and(0xFFFFFFFFLL), w.bitwise_right_shift(32).bitwise_and(0xFFFFFFFFLL)}, 1);
    }
  }
  const int64_t m = words.size(1);
  // Weights in [1, 2^20]: a product is below 2^52, so a chunk of 2^10 words sums below 2^62.
  // Chunk sums are folded by xor (equal rows still hash equal).
  const at::Tensor col = at::arange(m, words.options());
  const at::Tensor w1 = col.mul(40503).add(7919).remainder(1 << 20).add(1);
  const at::Tensor w2 = col.mul(69069).add(1013).remainder(1 << 20).add(1);
  at::Tensor h1 = at::zeros({n}, words.options()), h2 = at::zeros({n}, words.options());
  constexpr int64_t kChunk = 1 << 10;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t len = std::min(kChunk, m - c0);
    const at::Tensor part = words.narrow(1, c0, len);
    h1 = h1.bitwise_xor(part.mul(w1.narrow(0, c0, len)).sum(1));
    h2 = h2.bitwise_xor(part.mul(w2.narrow(0, c0, len)).sum(1));
  }
  // Sort by (h1, h2) and look for equal neighbours.
  const at::Tensor by2 = std::get<1>(at::sort(h2, /*stable=*/true, 0, false));
  const at::Tensor order = by2.index_select(0, std::get<1>(at::sort(h1.index_select(0, by2), /*stable=*/true, 0, false)));
  const at::Tensor s1 = h1.index_select(0, order), s2 = h2.index_select(0, order);
  const bool alike = s1.narrow(0, 1, n - 1).eq(s1.narrow(0, 0, n - 1))
                         .logical_and(s2.narrow(0, 1, n - 1).eq(s2.narrow(0, 0, n - 1)))
                         .any()
                         .item<bool>();
  if (alike) return duplicate_rows(gallery_in);
  const at::Tensor none = at::empty({0}, g.options().dtype(at::kLong));
  return {none, none};
}

}  // namespace sdml
