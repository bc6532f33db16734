#pragma once
// The product's own float32 GEMM for similarity blocks, scores = a b^T, on AVX2 + FMA.
//
// Why our own: on CPUs where torch's libraries run their AVX2 code (MKL on AMD), a GEMM of a
// query tile against a gallery packed once per search beats a library call per block, which
// re-packs the block for every query tile (measured on an AMD EPYC Zen 3 at the calibration's
// tile shape: 182-195 GFLOP/s against MKL's 160-168 and oneDNN's 153-165, both cores). The
// calibration (sdml/cpu_gemm.h) times it beside them and keeps whichever is fastest here.
//
// Arithmetic: every score is one chain of fused multiply-adds over the coordinates in order,
// starting from zero, whatever the call's shape and wherever the score lies in its output. So a
// query's scores do not depend on its tile or on the thread count, and a pair can be re-scored on
// its own to the same bits (cpu/retrieval/exact_dots.h's model with one chunk).
//
// Layout: b is packed in panels of kPanelCols rows; panel p holds rows [16 p, 16 p + 16) of b,
// coordinate-major: packed[p * 16 * d + k * 16 + j] = b[16 p + j][k] (rows past the end: zero).
// A block of columns that starts at a multiple of 16 is the packed data from p = c0 / 16 on.
#include <cstdint>

namespace sdml::panel_gemm {

constexpr int64_t kPanelCols = 16;

// Whether this CPU runs the kernel (AVX2 and FMA, x86-64 built by GCC or Clang).
bool available();

// Floats of the packed form of n rows of d coordinates.
inline int64_t packed_floats(int64_t n, int64_t d) { return (n + kPanelCols - 1) / kPanelCols * kPanelCols * d; }

// Packs rows [r0, r1) of b [*, d] (row stride ldb; r0 a multiple of 16) into `packed` (the
// packed form of all rows, written at the panels of r0..r1), each row divided by norms[r] when
// norms is given (the same float division as at::div). n: the total row count (padding after it).
void pack(const float* b, int64_t ldb, const float* norms, int64_t r0, int64_t r1, int64_t n, int64_t d,
          float* packed);

// out[i * ldc + j] = sum_k a[i * lda + k] * b[j][k] for i < rows, j < cols, with b given packed
// (its first row the block's first column). Single-threaded, on the calling thread.
//   a:      [rows, d], row stride lda
//   packed: packed_floats(cols, d) floats (or more: a block of a larger packed gallery)
//   out:    [rows, cols], row stride ldc
void scores(const float* a, int64_t rows, int64_t lda, const float* packed, int64_t cols, int64_t d, float* out,
            int64_t ldc);

// Rows of a packed for scores_above (once per query tile: the kernel's six rows then come from
// one sequential stream, not six): groups of kMicroRows rows, coordinate-major,
// out[(r / 6) * 6 * d + k * 6 + r % 6] = a[r][k]; a last group's missing rows are zero.
constexpr int64_t kMicroRows = 6;
inline int64_t packed_rows_floats(int64_t rows, int64_t d) { return (rows + kMicroRows - 1) / kMicroRows * kMicroRows * d; }
void pack_rows(const float* a, int64_t rows, int64_t lda, int64_t d, float* out);

// As scores(), for a running top-k: the 16 scores of row i in panel p (columns [16 p, 16 p + 16))
// are written, and hits[i * panels + p] set to 1, only where one of them exceeds above[i] (the
// row's k-th best so far: a later score that does not exceed it cannot enter); elsewhere
// hits[...] = 0 and out holds no score (at most a partial sum of a long row's passes).
// panels = ceil(cols / 16). Saves writing and re-reading
// a block of scores of which a small k keeps few. (A last, partial panel may be flagged by its
// padding's zero scores: the caller offers only its real columns.)
// a_packed: the rows as pack_rows gives them (the same bits as scores() on them unpacked).
void scores_above(const float* a_packed, int64_t rows, const float* packed, int64_t cols, int64_t d,
                  const float* above, float* out, int64_t ldc, uint8_t* hits);

}  // namespace sdml::panel_gemm
