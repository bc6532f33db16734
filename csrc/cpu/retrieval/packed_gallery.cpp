#include "packed_gallery.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <vector>

#include "sdml/cpu_gemm.h"
#include "sdml/panel_gemm.h"

// MKL's packed GEMM (CBLAS, 32-bit integers: torch's MKL interface). Weak: a torch without MKL
// leaves them null.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace sdml::cpu_retrieval {
namespace {

// CBLAS enumerators (mkl_cblas.h).
constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161;

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// Whether the packed API takes the arguments as declared above (32-bit integers): checked once
// per process on a small product of small integers (exact in any order), row stride and output
// stride wider than the rows, against a plain loop.
bool packed_gemm_works() {
  static const bool works = [] {
    constexpr int m = 37, n = 5, k = 7, ldg = 9, ldq = 8, ldc = 41;
    std::vector<float> g(m * ldg), q(n * ldq), c(n * ldc, -1.0f);
    for (int i = 0; i < m * ldg; ++i) g[i] = float(i % 5) - 2.0f;
    for (int i = 0; i < n * ldq; ++i) q[i] = float(i % 3) - 1.0f;
    std::vector<float> packed((cblas_sgemm_pack_get_size(kAMatrix, m, n, k) + sizeof(float) - 1) / sizeof(float) + 1);
    cblas_sgemm_pack(kColMajor, kAMatrix, kTrans, m, n, k, 1.0f, g.data(), ldg, packed.data());
    cblas_sgemm_compute(kColMajor, kPacked, kNoTrans, m, n, k, packed.data(), m, q.data(), ldq, 0.0f, c.data(), ldc);
    for (int r = 0; r < n; ++r)
      for (int j = 0; j < m; ++j) {
        float want = 0;
        for (int x = 0; x < k; ++x) want += q[r * ldq + x] * g[j * ldg + x];
        if (c[r * ldc + j] != want) return false;
      }
    return true;
  }();
  return works;
}

}  // namespace

PackedGallery::PackedGallery(const at::Tensor& gallery, int64_t rows, int64_t tiles) {
  if (gallery.scalar_type() != at::kFloat || tiles < 2) return;
  if (cpu_gemm_choice().gemm_into_rows == CpuGemm::Avx2) {
    // Our kernel's panels (sdml/panel_gemm.h), packed on every thread.
    const int64_t ng = gallery.size(0), d = gallery.size(1);
    if (ng == 0 || d == 0 || gallery.stride(1) != 1) return;
    const int64_t floats = panel_gemm::packed_floats(ng, d);
    if (floats * int64_t(sizeof(float)) > kMaxPackedBytes) return;
    packed_ = at::empty({floats}, gallery.options());
    const float* src = gallery.const_data_ptr<float>();
    float* dst = packed_.mutable_data_ptr<float>();
    const int64_t ld = gallery.stride(0), panels = floats / (panel_gemm::kPanelCols * d);
    at::parallel_for(0, panels, 16, [&](int64_t begin, int64_t end) {
      panel_gemm::pack(src, ld, nullptr, begin * panel_gemm::kPanelCols, std::min(ng, end * panel_gemm::kPanelCols), ng,
                       d, dst);
    });
    ours_ = true;
    ng_ = ng;
    d_ = d;
    return;
  }
  if (!cblas_sgemm_pack_get_size || !cblas_sgemm_pack || !cblas_sgemm_compute) return;
  if (cpu_gemm_choice().gemm_into_rows != CpuGemm::Blas || !packed_gemm_works()) return;
  const int64_t ng = gallery.size(0), d = gallery.size(1);
  if (ng == 0 || d == 0 || !fits_int(ng) || !fits_int(d) || !fits_int(rows) || gallery.stride(1) != 1) return;
  // Column-major view: the scores' transpose [ng, rows] = A [ng, d] times B [d, rows], A the
  // gallery (stored as its transpose, d x ng), B a query tile (stored as d x rows).
  const size_t bytes = cblas_sgemm_pack_get_size(kAMatrix, int(ng), int(rows), int(d));
  if (bytes == 0 || int64_t(bytes) > kMaxPackedBytes) return;
  packed_ = at::empty({int64_t(bytes + sizeof(float) - 1) / int64_t(sizeof(float))}, gallery.options());
  cblas_sgemm_pack(kColMajor, kAMatrix, kTrans, int(ng), int(rows), int(d), 1.0f, gallery.const_data_ptr<float>(),
                   int(gallery.stride(0)), packed_.mutable_data_ptr<float>());
  ng_ = ng;
  d_ = d;
}

void PackedGallery::scores_into(const at::Tensor& q_tile, float* out, int64_t out_stride) const {
  const at::Tensor q = q_tile.stride(1) == 1 ? q_tile : q_tile.contiguous();
  if (ours_) {
    panel_gemm::scores(q.const_data_ptr<float>(), q.size(0), q.stride(0), packed_.const_data_ptr<float>(), ng_, d_, out,
                       out_stride);
    return;
  }
  cblas_sgemm_compute(kColMajor, kPacked, kNoTrans, int(ng_), int(q.size(0)), int(d_), packed_.const_data_ptr<float>(),
                      int(ng_), q.const_data_ptr<float>(), int(q.stride(0)), 0.0f, out, int(out_stride));
}

}  // namespace sdml::cpu_retrieval
