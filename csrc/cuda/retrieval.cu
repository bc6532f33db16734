// CUDA kernels of the retrieval ops, launched on the current stream. A tile of query rows is
// scored with one GEMM (at::mm) and each row is ordered with a stable descending sort (equal
// scores keep ascending gallery index); under exclude_self the query's own item scores -inf,
// so it sorts last and is left out. cosine_topk keeps the first k of each sorted row. The
// ranking metrics come from one kernel, a thread block per query row: it scans the row's
// relevance in rank order (a block-wide prefix sum gives the hit count h at each rank p) and
// accumulates AP@k, P@K and the precision of every relevant item for the interpolated PR
// curve, with the per-query math of sdml/retrieval_math.h shared with the CPU kernel.
// Exact duplicates of a gallery row get their first row's score before the sort, as on the CPU,
// so identical rows always tie. average_precision_pair scores a tile of a's rows against b once
// and keeps the tile's transpose: the [Nb, Na] scores of b's queries, ranked afterwards.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <limits>
#include <vector>

#include "sdml/checks.h"
#include "sdml/retrieval.h"

namespace sdml {
namespace {

using namespace retrieval;

constexpr int kThreads = 512;
// Scores (and sort buffers) of one tile: at most this many elements.
constexpr int64_t kTileElements = int64_t{1} << 26;
// Cut-offs of precision_at_k and recall levels of precision_recall_curve kept in shared memory.
constexpr int64_t kMaxPoints = 1024;

int64_t tile_rows(int64_t nq, int64_t ng) {
  return std::max<int64_t>(1, std::min<int64_t>(nq, kTileElements / ng));
}

// Scores of queries [q0, q0 + rows) against the gallery [rows, Ng]; duplicate gallery rows take
// their first row's score.
at::Tensor score_tile(const at::Tensor& query, const at::Tensor& gallery, const DuplicateRows& duplicates,
                      int64_t q0, int64_t rows) {
  at::Tensor scores = at::mm(query.narrow(0, q0, rows), gallery.t());
  if (duplicates.size() > 0) scores.index_copy_(1, duplicates.dup, scores.index_select(1, duplicates.rep));
  return scores;
}

// The tile's rows ordered best first (stable: equal scores keep ascending gallery index); under
// exclude_self, query q0 + i's own item (column q0 + i) sorts last.
at::Tensor sorted_order(at::Tensor scores, int64_t q0, bool exclude_self, at::Tensor* sorted_scores) {
  if (exclude_self) {
    // Element (i, q0 + i) of the tile: stride ng + 1 from element (0, q0).
    const int64_t rows = scores.size(0), ng = scores.size(1);
    scores.view({-1}).narrow(0, q0, (rows - 1) * (ng + 1) + 1)
        .as_strided({rows}, {ng + 1})
        .fill_(-std::numeric_limits<double>::infinity());
  }
  auto [values, order] = at::sort(scores, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  if (sorted_scores) *sorted_scores = values;
  return order;
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cuda(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                    int64_t k, bool exclude_self) {
  constexpr const char* op = "cosine_topk";
  const RetrievalSizes sizes = retrieval_prologue(op, query_in, gallery_in, exclude_self);
  check_topk_k(op, k, sizes.ranked, exclude_self);
  const c10::cuda::CUDAGuard guard(query_in.device());
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  const int64_t nq = sizes.nq, ng = sizes.ng;
  const DuplicateRows duplicates = duplicate_rows(gallery_in);
  at::Tensor scores = at::empty({nq, k}, query.options());
  at::Tensor indices = at::empty({nq, k}, query.options().dtype(at::kLong));
  const int64_t rows = tile_rows(nq, ng);
  for (int64_t q0 = 0; q0 < nq; q0 += rows) {
    const int64_t n = std::min(rows, nq - q0);
    at::Tensor values;
    const at::Tensor order = sorted_order(score_tile(query, gallery, duplicates, q0, n), q0, exclude_self, &values);
    scores.narrow(0, q0, n).copy_(values.narrow(1, 0, k));
    indices.narrow(0, q0, n).copy_(order.narrow(1, 0, k));
  }
  return {scores, indices};
}

// ---- relevance on the device ---------------------------------------------------------------

struct ClassIds {
  const int64_t* query;
  const int64_t* gallery;
  __device__ bool operator()(int64_t qi, int64_t gi) const {
    const int64_t c = query[qi];
    return c >= 0 && gallery[gi] == c;
  }
};

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

// What the metrics kernel computes; a null output is skipped.
struct MetricArgs {
  int64_t q0, ng, ranked, cutoff;  // cutoff: k of AP@k
  bool exclude_self;
  Divisor divisor;
  Empty empty;
  const int64_t* ks;
  int64_t n_ks;
  const double* levels;
  int64_t n_levels;
  double* ap;         // [Nq]
  double* patk;       // [Nq, n_ks]
  double* pr;         // [Nq, n_levels]
  double* precision;  // [rows, ranked] scratch for pr: precision of the h-th relevant item
};

using Max = cub::BlockReduce<double, kThreads>;

// The interpolated precision at each recall level of query qi, from the precision of its R
// relevant items in rank order (precision[h - 1] for the h-th); the whole block calls it.
__device__ void write_pr_curve(const MetricArgs& a, int64_t qi, int64_t R, const double* precision,
                               typename Max::TempStorage& storage, double& best) {
  for (int64_t m = 0; m < a.n_levels; ++m) {
    if (R == 0) {
      if (threadIdx.x == 0) a.pr[qi * a.n_levels + m] = empty_value(a.empty);
      continue;
    }
    const int64_t h0 = first_reaching(a.levels[m], R);
    double part = 0;
    for (int64_t h = h0 + threadIdx.x; h <= R; h += blockDim.x) part = fmax(part, precision[h - 1]);
    const double top = Max(storage).Reduce(part, ::cuda::maximum<>{});
    if (threadIdx.x == 0) best = top;
    __syncthreads();
    if (threadIdx.x == 0) a.pr[qi * a.n_levels + m] = best;
    __syncthreads();
  }
}

template <typename Relevance>
__global__ void __launch_bounds__(kThreads)
    ranking_metrics_kernel(const int64_t* __restrict__ order, Relevance relevance, MetricArgs a) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  using Sum = cub::BlockReduce<double, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Sum::TempStorage sum_storage;
  __shared__ int64_t chunk_hits, hits_at[kMaxPoints];
  __shared__ double best;
  const int64_t row = blockIdx.x, qi = a.q0 + row, self = a.exclude_self ? qi : -1;
  const int64_t* ranked_order = order + row * a.ng;
  double* precision = a.precision ? a.precision + row * a.ranked : nullptr;
  for (int64_t j = threadIdx.x; j < a.n_ks; j += blockDim.x) hits_at[j] = -1;
  __syncthreads();

  int64_t before = 0;  // relevant items at ranks before this chunk
  double ap_part = 0;
  int64_t within_part = 0;
  for (int64_t start = 0; start < a.ranked; start += kThreads) {
    const int64_t j = start + threadIdx.x, p = j + 1;  // the item at rank p (self sorts last)
    int64_t rel = 0;
    if (j < a.ranked) {
      const int64_t gi = ranked_order[j];
      rel = gi != self && relevance(qi, gi);
    }
    int64_t h, total;
    Scan(scan_storage).InclusiveSum(rel, h, total);
    h += before;
    if (rel) {
      const double prec = precision_term(h, p);
      if (p <= a.cutoff) {
        ap_part += prec;
        ++within_part;
      }
      if (precision) precision[h - 1] = prec;
    }
    if (j < a.ranked) {
      for (int64_t m = 0; m < a.n_ks; ++m)
        if (a.ks[m] == p) hits_at[m] = h;
    }
    before += total;
    __syncthreads();  // scan_storage is reused by the next chunk
  }
  const int64_t R = before;
  const double ap_sum = Sum(sum_storage).Sum(ap_part);
  __syncthreads();
  const int64_t r = Sum(sum_storage).Sum(double(within_part)) + 0.5;
  __syncthreads();
  if (threadIdx.x == 0 && a.ap) a.ap[qi] = average_precision_from(ap_sum, r, R, a.divisor, a.empty);
  for (int64_t m = threadIdx.x; m < a.n_ks && a.patk; m += blockDim.x) {
    const int64_t hits = hits_at[m] >= 0 ? hits_at[m] : R;  // K beyond the ranking: every hit
    a.patk[qi * a.n_ks + m] = R == 0 ? empty_value(a.empty) : precision_at(hits, a.ks[m], a.ranked);
  }
  if (a.pr) write_pr_curve(a, qi, R, precision, sum_storage, best);
}

// Launches the metrics kernel on the n sorted rows of `order` (queries a.q0 ...); swapped: the
// queries are labels.gallery's rows and the ranked items labels.query's (b's queries against a).
void launch_metrics(const at::Tensor& order, const RetrievalLabels& labels, bool swapped, const MetricArgs& a) {
  const int64_t n = order.size(0);
  const int64_t* ql = (swapped ? labels.gallery : labels.query).const_data_ptr<int64_t>();
  const int64_t* gl = (swapped ? labels.query : labels.gallery).const_data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (labels.multi_hot) {
    ranking_metrics_kernel<<<n, kThreads, 0, stream>>>(order.const_data_ptr<int64_t>(), LabelBits{ql, gl, labels.words()}, a);
  } else {
    ranking_metrics_kernel<<<n, kThreads, 0, stream>>>(order.const_data_ptr<int64_t>(), ClassIds{ql, gl}, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The common path of the metric ops: checks, tiles, sort, kernel.
void ranking_metrics_cuda(const char* op, const at::Tensor& query_in, const at::Tensor& gallery_in,
                          const at::Tensor& query_labels, const at::Tensor& gallery_labels, bool exclude_self,
                          MetricArgs args, const std::vector<int64_t>& ks, const std::vector<double>& levels) {
  const c10::cuda::CUDAGuard guard(query_in.device());
  auto [query, gallery] = normalized_embeddings(op, query_in, gallery_in, exclude_self);
  const RetrievalLabels labels = prepare_labels(op, query_labels, gallery_labels, query, gallery);
  const DuplicateRows duplicates = duplicate_rows(gallery_in);
  SDML_CHECK_VALUE(int64_t(ks.size()) <= kMaxPoints && int64_t(levels.size()) <= kMaxPoints, op,
                   ": on CUDA at most ", kMaxPoints, " cut-offs or recall levels");
  const int64_t nq = query.size(0), ng = gallery.size(0);
  const auto device = query.options();
  const at::Tensor ks_dev = at::tensor(ks, at::kLong).to(query.device());
  const at::Tensor levels_dev = at::tensor(levels, at::kDouble).to(query.device());
  args.ng = ng;
  args.ranked = ranked_items(ng, exclude_self);
  args.exclude_self = exclude_self;
  args.ks = ks.empty() ? nullptr : ks_dev.const_data_ptr<int64_t>();
  args.n_ks = ks.size();
  args.levels = levels.empty() ? nullptr : levels_dev.const_data_ptr<double>();
  args.n_levels = levels.size();
  const int64_t rows = tile_rows(nq, ng);
  at::Tensor precision;
  if (args.pr) precision = at::empty({rows, args.ranked}, device.dtype(at::kDouble));
  args.precision = args.pr ? precision.mutable_data_ptr<double>() : nullptr;
  for (int64_t q0 = 0; q0 < nq; q0 += rows) {
    const int64_t n = std::min(rows, nq - q0);
    args.q0 = q0;
    launch_metrics(sorted_order(score_tile(query, gallery, duplicates, q0, n), q0, exclude_self, nullptr), labels,
                   /*swapped=*/false, args);
  }
}

MetricArgs no_outputs() {
  MetricArgs a{};
  a.divisor = Divisor::Retrieved;
  a.empty = Empty::Zero;
  return a;
}

at::Tensor average_precision_cuda(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_labels,
                                  const at::Tensor& gallery_labels, std::optional<int64_t> k,
                                  c10::string_view divisor, c10::string_view empty, bool exclude_self) {
  constexpr const char* op = "average_precision";
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, query_labels, gallery_labels, exclude_self);
  MetricArgs a = no_outputs();
  a.divisor = parse_divisor(op, divisor);
  a.empty = parse_empty(op, empty);
  a.cutoff = resolve_k(op, k, sizes.ranked);
  at::Tensor ap = at::empty({sizes.nq}, query.options().dtype(at::kDouble));
  a.ap = ap.mutable_data_ptr<double>();
  ranking_metrics_cuda(op, query, gallery, query_labels, gallery_labels, exclude_self, a, {}, {});
  return ap;
}

std::tuple<at::Tensor, at::Tensor> average_precision_pair_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                                               const at::Tensor& a_labels, const at::Tensor& b_labels,
                                                               std::optional<int64_t> k, c10::string_view divisor,
                                                               c10::string_view empty) {
  constexpr const char* op = "average_precision_pair";
  const RetrievalSizes sizes = retrieval_prologue(op, a_in, b_in, a_labels, b_labels, /*exclude_self=*/false);
  SDML_CHECK_VALUE(sizes.nq > 0, op, ": a has no rows (nothing to rank for b's queries)");
  const c10::cuda::CUDAGuard guard(a_in.device());
  MetricArgs x = no_outputs();
  x.divisor = parse_divisor(op, divisor);
  x.empty = parse_empty(op, empty);
  auto [a, b] = normalized_embeddings(op, a_in, b_in, /*exclude_self=*/false);
  const RetrievalLabels labels = prepare_labels(op, a_labels, b_labels, a, b);
  const int64_t na = sizes.nq, nb = sizes.ng;
  const DuplicateRows b_duplicates = duplicate_rows(b_in), a_duplicates = duplicate_rows(a_in);
  at::Tensor ap_ab = at::empty({na}, a.options().dtype(at::kDouble));
  at::Tensor ap_ba = at::empty({nb}, a.options().dtype(at::kDouble));
  at::Tensor scores_ba = at::empty({nb, na}, a.options());
  // a's queries against b, each tile's transpose kept as columns of b's queries against a.
  x.ng = x.ranked = nb;
  x.cutoff = resolve_k(op, k, nb);
  x.ap = ap_ab.mutable_data_ptr<double>();
  const int64_t rows_a = tile_rows(na, nb);
  for (int64_t q0 = 0; q0 < na; q0 += rows_a) {
    const int64_t n = std::min(rows_a, na - q0);
    const at::Tensor tile = score_tile(a, b, b_duplicates, q0, n);
    scores_ba.narrow(1, q0, n).copy_(tile.t());
    x.q0 = q0;
    launch_metrics(sorted_order(tile, q0, false, nullptr), labels, /*swapped=*/false, x);
  }
  // b's queries against a; duplicates of a's rows take their first row's score.
  if (a_duplicates.size() > 0)
    scores_ba.index_copy_(1, a_duplicates.dup, scores_ba.index_select(1, a_duplicates.rep));
  MetricArgs y = x;
  y.ng = y.ranked = na;
  y.cutoff = resolve_k(op, k, na);
  y.ap = ap_ba.mutable_data_ptr<double>();
  const int64_t rows_b = tile_rows(nb, na);
  for (int64_t q0 = 0; q0 < nb; q0 += rows_b) {
    const int64_t n = std::min(rows_b, nb - q0);
    y.q0 = q0;
    launch_metrics(sorted_order(scores_ba.narrow(0, q0, n), q0, false, nullptr), labels, /*swapped=*/true, y);
  }
  return {ap_ab, ap_ba};
}

at::Tensor precision_at_k_cuda(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_labels,
                               const at::Tensor& gallery_labels, at::IntArrayRef ks, c10::string_view empty,
                               bool exclude_self) {
  constexpr const char* op = "precision_at_k";
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, query_labels, gallery_labels, exclude_self);
  check_cutoffs(op, ks);
  MetricArgs a = no_outputs();
  a.empty = parse_empty(op, empty);
  at::Tensor prec = at::empty({sizes.nq, int64_t(ks.size())}, query.options().dtype(at::kDouble));
  a.patk = prec.mutable_data_ptr<double>();
  ranking_metrics_cuda(op, query, gallery, query_labels, gallery_labels, exclude_self, a,
                       std::vector<int64_t>(ks.begin(), ks.end()), {});
  return prec;
}

at::Tensor precision_recall_curve_cuda(const at::Tensor& query, const at::Tensor& gallery,
                                       const at::Tensor& query_labels, const at::Tensor& gallery_labels,
                                       at::ArrayRef<double> recall_levels, c10::string_view empty,
                                       bool exclude_self) {
  constexpr const char* op = "precision_recall_curve";
  const RetrievalSizes sizes = retrieval_prologue(op, query, gallery, query_labels, gallery_labels, exclude_self);
  check_recall_levels(op, recall_levels);
  MetricArgs a = no_outputs();
  a.empty = parse_empty(op, empty);
  at::Tensor prec = at::empty({sizes.nq, int64_t(recall_levels.size())}, query.options().dtype(at::kDouble));
  a.pr = prec.mutable_data_ptr<double>();
  ranking_metrics_cuda(op, query, gallery, query_labels, gallery_labels, exclude_self, a, {},
                       std::vector<double>(recall_levels.begin(), recall_levels.end()));
  return prec;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdml, CUDA, m) {
  m.impl("cosine_topk", &cosine_topk_cuda);
  m.impl("average_precision", &average_precision_cuda);
  m.impl("average_precision_pair", &average_precision_pair_cuda);
  m.impl("precision_at_k", &precision_at_k_cuda);
  m.impl("precision_recall_curve", &precision_recall_curve_cuda);
}

}  // namespace sdml
