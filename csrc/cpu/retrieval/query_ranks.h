#pragma once
// The ranks of every query's relevant items, tile by tile: a tile of query rows is scored
// against the whole gallery (in column blocks, BlockGemm), duplicates of gallery rows get their
// first row's score, and each row goes to a RelevantRanker. The ranking metrics are computed
// from these ranks by the entry points (csrc/cpu/retrieval.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "block_gemm.h"
#include "duplicate_scores.h"
#include "packed_gallery.h"
#include "relevant_ranker.h"
#include "tiles.h"

namespace sdml::cpu_retrieval {

// Scores of a tile of query rows against the whole gallery into a [rows, Ng] buffer: one call on
// the packed gallery where there is one (PackedGallery), else in column blocks whose output fits
// the L2 cache (the GEMM runs faster so); duplicates of gallery rows then get their first row's
// score.
template <typename T>
void score_tile(const BlockGemm& gemm, const PackedGallery& packed, const at::Tensor& q_tile,
                const at::Tensor& gallery, const DuplicateScores& duplicates, at::Tensor& buffer,
                std::vector<T>& saved) {
  const int64_t nrows = q_tile.size(0), ng = gallery.size(0);
  if constexpr (std::is_same_v<T, float>) {
    if (packed) packed.scores_into(q_tile, buffer.mutable_data_ptr<float>(), ng);
  }
  for (int64_t g0 = 0; g0 < ng && !packed; g0 += kBlockCols) {
    const int64_t ncols = std::min(kBlockCols, ng - g0);
    at::Tensor block = buffer.narrow(0, 0, nrows).narrow(1, g0, ncols);  // row stride ng
    gemm.scores_into(q_tile, gallery.narrow(0, g0, ncols), block);
  }
  saved.resize(nrows * duplicates.slots());
  duplicates.apply(buffer.mutable_data_ptr<T>(), nrows, ng, 0, ng, saved.data());
}

// Writes rows [q0, q0 + rows) of the [rows, ng] scores s as columns of the [ng, nq] matrix out.
template <typename T>
void transpose_into(const T* s, int64_t rows, int64_t ng, T* out, int64_t nq, int64_t q0) {
  constexpr int64_t kStrip = 16;  // out rows written together, each advancing with i
  for (int64_t j0 = 0; j0 < ng; j0 += kStrip) {
    const int64_t j1 = std::min(ng, j0 + kStrip);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = j0; j < j1; ++j) out[j * nq + q0 + i] = s[i * ng + j];
  }
}

// Calls consume(qi, ranks) for every query, ranks as RelevantRanker::rank. Each thread takes
// tiles of query rows, scores a tile (score_tile) and ranks its rows. When `transposed` is not
// null, the scores are also written to it as an [Ng, Nq] matrix (the other direction's rows).
template <typename T, typename Relevance, typename Consume>
void for_each_query_ranks(const at::Tensor& query, const at::Tensor& gallery, const DuplicateScores& duplicates,
                          const Relevance& relevance, bool exclude_self, const Consume& consume,
                          T* transposed = nullptr) {
  const int64_t nq = query.size(0), ng = gallery.size(0);
  const int64_t rows = tile_rows(nq, ng, sizeof(T));
  const int64_t tiles = (nq + rows - 1) / rows;
  const BlockGemm gemm(query.scalar_type());  // outside the threads: it may time the GEMMs
  const PackedGallery packed(gallery, rows, tiles);  // outside the threads too
  struct Scratch {
    at::Tensor buffer;
    std::unique_ptr<RelevantRanker<T>> ranker;
    std::vector<int64_t> rel;
    std::vector<T> saved;
  };
  const auto setup = [&] {
    return Scratch{at::empty({rows, ng}, query.options()), std::make_unique<RelevantRanker<T>>(ng), {}, {}};
  };
  for_each_tile(tiles, setup, [&](Scratch& scratch, int64_t tile) {
    const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
    score_tile<T>(gemm, packed, query.narrow(0, q0, nrows), gallery, duplicates, scratch.buffer, scratch.saved);
    const T* s = scratch.buffer.template const_data_ptr<T>();
    if (transposed) transpose_into(s, nrows, ng, transposed, nq, q0);
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t qi = q0 + i, self = exclude_self ? qi : -1;
      relevance.collect(qi, self, scratch.rel);
      const T* next = i + 1 < nrows ? s + (i + 1) * ng : nullptr;  // prefetched meanwhile
      consume(qi, scratch.ranker->rank(s + i * ng, scratch.rel, self, next));
    }
  });
}

// Calls consume(qi, ranks) for every row qi of the [nq, ng] score matrix s (rows are modified:
// duplicates of gallery rows get their first row's score).
template <typename T, typename Relevance, typename Consume>
void for_each_row_ranks(T* s, int64_t nq, int64_t ng, const DuplicateScores& duplicates, const Relevance& relevance,
                        const Consume& consume) {
  const int64_t rows = std::max<int64_t>(1, (nq + kTilesPerThread * at::get_num_threads() - 1) /
                                                (kTilesPerThread * at::get_num_threads()));
  struct Scratch {
    std::unique_ptr<RelevantRanker<T>> ranker;
    std::vector<int64_t> rel;
    std::vector<T> saved;
  };
  const auto setup = [&] {
    return Scratch{std::make_unique<RelevantRanker<T>>(ng), {}, std::vector<T>(duplicates.slots())};
  };
  for_each_tile((nq + rows - 1) / rows, setup, [&](Scratch& scratch, int64_t tile) {
    const int64_t end = std::min(nq, (tile + 1) * rows);
    for (int64_t qi = tile * rows; qi < end; ++qi) {
      duplicates.apply(s + qi * ng, 1, ng, 0, ng, scratch.saved.data());
      relevance.collect(qi, -1, scratch.rel);
      consume(qi, scratch.ranker->rank(s + qi * ng, scratch.rel, -1, qi + 1 < end ? s + (qi + 1) * ng : nullptr));
    }
  });
}

}  // namespace sdml::cpu_retrieval
