#pragma once
// cosine_topk on the CPU: a running top-k per query (RunningTopK) fed block by block with the
// tiles' scores. Few query tiles (few queries): each tile's gallery is split into ranges of
// blocks scored on different threads and merged exactly (gallery_ranges), so few queries use
// every thread too and the results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "block_gemm.h"
#include "duplicate_scores.h"
#include "running_topk.h"
#include "tiles.h"

#include "sdml/panel_gemm.h"

namespace sdml::cpu_retrieval {

// Bytes of the running top-k candidates of one tile (cosine_topk).
// Fewer tile rows only for a very large k: fewer rows re-read the gallery more often and starve
// the GEMM (k = 1000, 1,000 x 50,000: 0.70 CPU-s at 32 rows, 0.49 at 250), which costs more than running
// the candidate buffers (2k items per row, mostly untouched) outside the L2 cache.
constexpr int64_t kCandidateBytes = 16 << 20;

// Query rows per tile of topk_tiles: fewer for a very large k (kCandidateBytes; Scored<T> is 16
// bytes for float and double). The bf16 mode (topk_bf16.cpp) mirrors the GEMM calls this makes.
inline int64_t topk_tile_rows(int64_t nq, int64_t k, size_t elem) {
  return std::min(tile_rows(nq, kBlockCols, elem), std::max<int64_t>(kMinTileRows, kCandidateBytes / (2 * k * 16)));
}

// The k best gallery items of every query, best first, into scores [nq, k] and indices [nq, k]
// (row-major). query [nq, d]: L2-normalized rows; raw_gallery [ng, d] and gallery_norms [ng, 1]:
// the gallery as given and its row norms (gallery rows are normalized here, once or per block);
// duplicates: of raw_gallery's rows. Under exclude_self, query i never returns item i.
template <typename T>
void topk_tiles(const at::Tensor& query, const at::Tensor& raw_gallery, const at::Tensor& gallery_norms,
                const DuplicateScores& duplicates, int64_t k, bool exclude_self, T* scores, int64_t* indices) {
  const int64_t nq = query.size(0), ng = raw_gallery.size(0), d = query.size(1);

  const int64_t rows = topk_tile_rows(nq, k, sizeof(T));
  const int64_t tiles = (nq + rows - 1) / rows, blocks = (ng + kBlockCols - 1) / kBlockCols;
  const int64_t ranges = gallery_ranges(tiles, blocks);
  // One range per tile: the gallery normalized once. Several (few queries, where this per-call
  // copy of the whole gallery would cost more than the GEMMs): each block is normalized as it is
  // scored, into the thread's scratch, to the same values.
  const BlockGemm gemm(query.scalar_type());
  // With our AVX2 kernel chosen (one range, float32): the gallery normalized and packed once
  // (sdml/panel_gemm.h), in place of the normalized copy; its blocks are then scored without a
  // per-call copy, to the same bits as gemm.scores().
  at::Tensor packed;
  if constexpr (std::is_same_v<T, float>) {
    if (ranges == 1 && gemm.panel_kernel() && query.stride(1) == 1) {
      packed = at::empty({panel_gemm::packed_floats(ng, d)}, query.options());
      const at::Tensor raw = raw_gallery.contiguous(), norms = gallery_norms.contiguous();
      const float *src = raw.const_data_ptr<float>(), *n = norms.const_data_ptr<float>();
      float* dst = packed.mutable_data_ptr<float>();
      const int64_t panels = (ng + panel_gemm::kPanelCols - 1) / panel_gemm::kPanelCols;
      at::parallel_for(0, panels, 16, [&](int64_t begin, int64_t end) {
        panel_gemm::pack(src, d, n, begin * panel_gemm::kPanelCols, std::min(ng, end * panel_gemm::kPanelCols), ng,
                         d, dst);
      });
    }
  }
  const at::Tensor gallery = ranges > 1 || packed.defined() ? raw_gallery : at::div(raw_gallery, gallery_norms);
  static_assert(sizeof(Scored<T>) == 16);
  const int64_t slots = duplicates.slots();
  // One range: duplicates take their first row's score block by block (per-thread `saved`).
  // Several: they are masked in the ranges and offered in the merge, from the shared `saved`.
  std::vector<T> shared_saved(ranges > 1 ? nq * slots : 0);
  std::vector<std::vector<Scored<T>>> kept(ranges > 1 ? nq * ranges : 0);  // [query, range]
  struct Scratch {
    at::Tensor buffer, normalized;  // scores of a block; the normalized block (several ranges)
    std::vector<RunningTopK<T>> best;
    std::vector<T> saved;
    std::vector<float> above;     // packed gallery: each row's threshold at the block's start
    std::vector<uint8_t> hits;    // packed gallery: [rows, panels of a block] (panel_gemm.h)
    std::vector<float> q_packed;  // packed gallery: the query tile, packed once (pack_rows)
  };
  constexpr int64_t kBlockPanels = kBlockCols / panel_gemm::kPanelCols;
  static_assert(kBlockCols % panel_gemm::kPanelCols == 0);
  const auto setup = [&] {
    return Scratch{at::empty({rows * kBlockCols}, query.options()),
                   at::empty({ranges > 1 ? kBlockCols : 0, d}, query.options()),
                   std::vector<RunningTopK<T>>(rows, RunningTopK<T>(k)),
                   std::vector<T>(ranges > 1 ? 0 : rows * slots),
                   std::vector<float>(packed.defined() ? rows : 0),
                   std::vector<uint8_t>(packed.defined() ? rows * kBlockPanels : 0),
                   std::vector<float>(packed.defined() ? panel_gemm::packed_rows_floats(rows, d) : 0)};
  };
  for_each_tile(tiles * ranges, setup, [&](Scratch& scratch, int64_t item) {
    const int64_t tile = item / ranges, range = item % ranges;
    std::vector<RunningTopK<T>>& best = scratch.best;
    const int64_t q0 = tile * rows, nrows = std::min(rows, nq - q0);
    const int64_t g_begin = range * blocks / ranges * kBlockCols;
    const int64_t g_end = std::min(ng, (range + 1) * blocks / ranges * kBlockCols);
    const at::Tensor q_tile = query.narrow(0, q0, nrows);
    for (int64_t i = 0; i < nrows; ++i) best[i].reset();
    if (packed.defined()) {
      if constexpr (std::is_same_v<T, float>)
        panel_gemm::pack_rows(q_tile.const_data_ptr<float>(), nrows, query.stride(0), d, scratch.q_packed.data());
    }
    for (int64_t g0 = g_begin; g0 < g_end; g0 += kBlockCols) {
      const int64_t ncols = std::min(kBlockCols, ng - g0);
      at::Tensor block = scratch.buffer.narrow(0, 0, nrows * ncols).view({nrows, ncols});
      at::Tensor g_block = gallery.narrow(0, g0, ncols);
      if (ranges > 1) {
        at::Tensor normalized = scratch.normalized.narrow(0, 0, ncols);
        g_block = at::div_out(normalized, g_block, gallery_norms.narrow(0, g0, ncols));
      }
      if constexpr (std::is_same_v<T, float>) {
        if (packed.defined()) {
          // The kernel writes only the 16-score panels a row's running top-k can take (a score
          // above its threshold at the block's start; the threshold only rises, and offer_block
          // tests each score again), and flags them: the rest is neither written nor read back.
          // Exact duplicates need no fix-up here: each score is one FMA chain of the pair alone.
          for (int64_t i = 0; i < nrows; ++i) scratch.above[i] = best[i].threshold();
          float* s = block.mutable_data_ptr<float>();
          const int64_t panels = (ncols + panel_gemm::kPanelCols - 1) / panel_gemm::kPanelCols;
          panel_gemm::scores_above(scratch.q_packed.data(), nrows, packed.const_data_ptr<float>() + g0 * d, ncols, d,
                                   scratch.above.data(), s, ncols, scratch.hits.data());
          for (int64_t i = 0; i < nrows; ++i) {
            const uint8_t* hit = scratch.hits.data() + i * panels;
            for (int64_t p = 0; p < panels; ++p) {
              if (!hit[p]) continue;
              const int64_t c0 = p * panel_gemm::kPanelCols;
              best[i].offer_block(s + i * ncols + c0, std::min(panel_gemm::kPanelCols, ncols - c0), g0 + c0,
                                  exclude_self ? q0 + i : -1);
            }
          }
          continue;
        }
      }
      block = gemm.scores(q_tile, g_block, block);
      T* s = block.mutable_data_ptr<T>();
      if (ranges > 1) {
        duplicates.save_firsts_mask_dups(s, nrows, ncols, g0, ncols, shared_saved.data() + q0 * slots);
      } else {
        duplicates.apply(s, nrows, ncols, g0, ncols, scratch.saved.data());
      }
      for (int64_t i = 0; i < nrows; ++i) best[i].offer_block(s + i * ncols, ncols, g0, exclude_self ? q0 + i : -1);
    }
    for (int64_t i = 0; i < nrows; ++i) {
      if (ranges > 1) {
        best[i].finish_into(kept[(q0 + i) * ranges + range]);
      } else {
        best[i].finish(scores + (q0 + i) * k, indices + (q0 + i) * k);
      }
    }
  });
  if (ranges > 1) {
    at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
      std::vector<Scored<T>> all;
      for (int64_t qi = begin; qi < end; ++qi) {
        all.clear();
        for (int64_t r = 0; r < ranges; ++r) all.insert(all.end(), kept[qi * ranges + r].begin(), kept[qi * ranges + r].end());
        duplicates.offer_saved(shared_saved.data() + qi * slots, exclude_self ? qi : -1,
                               [&](T score, int64_t index) { all.push_back({score, index}); });
        // every item is in a range's best k or a duplicate, so at least k candidates
        std::nth_element(all.begin(), all.begin() + (k - 1), all.end());
        std::sort(all.begin(), all.begin() + k);
        for (int64_t j = 0; j < k; ++j) {
          scores[qi * k + j] = all[j].score;
          indices[qi * k + j] = all[j].index;
        }
      }
    });
  }
}

}  // namespace sdml::cpu_retrieval
