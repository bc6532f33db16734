#pragma once
// The gallery packed once, for all query tiles, in MKL's own GEMM layout (cblas_sgemm_pack) or,
// where the tile GEMM choice is our AVX2 kernel, in its panels (sdml/panel_gemm.h), so that a
// tile's scores against the whole gallery are one call.
//
// Why: a plain GEMM packs its operands on every call, and the metric tiles (a few hundred query
// rows against the whole gallery) re-packed the whole gallery for every tile: about a tenth of
// average_precision's time on an AVX-512 Xeon (profiled). Packed once, the work is paid once per
// call, on all threads. A bonus: with the packed gallery, a query row's scores are bitwise the same
// whatever the tile's height and the row's place in it (measured for 1 to 256 rows; at::mm takes
// other kernels for short tiles), so they do not depend on how the thread count cut the tiles.
//
// Used for float32 where the process's GEMM choice for tiles written into rows (sdml/cpu_gemm.h) is
// our kernel, or is BLAS and torch's MKL exports the packed API (weak symbols: absent elsewhere,
// and then the tiles run BlockGemm as before) and a small exact product through it checks out
// (once per process: the declarations assume MKL's 32-bit integer interface); there must be more
// than one query tile to share the packing, and the packed copy stay within kMaxPackedBytes.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "block_gemm.h"

namespace sdml::cpu_retrieval {

constexpr int64_t kMaxPackedBytes = int64_t{1} << 30;

class PackedGallery {
 public:
  // Packs `gallery` [ng, d] (contiguous rows) when the conditions above hold, for tiles of at
  // most `rows` query rows, `tiles` of them; otherwise empty. Call outside parallel regions (MKL
  // packs on its own threads).
  PackedGallery(const at::Tensor& gallery, int64_t rows, int64_t tiles);

  explicit operator bool() const { return packed_.defined(); }

  // out [rows, ng] (row stride out_stride) = q_tile [rows, d] (contiguous rows) times the
  // gallery transposed, on the calling thread.
  void scores_into(const at::Tensor& q_tile, float* out, int64_t out_stride) const;

 private:
  at::Tensor packed_;
  bool ours_ = false;  // our kernel's panels, not MKL's layout
  int64_t ng_ = 0, d_ = 0;
};

}  // namespace sdml::cpu_retrieval
