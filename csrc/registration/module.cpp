// The sdml_ext._C Python module. Loading it runs the static op registrations (the namespace here,
// schemas in csrc/registration/<family>.cpp, kernels in csrc/); the module itself reports how it was
// built and exposes the host-side checks that the fake implementations share with the kernels.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "sdml/cpu_gemm.h"
#include "sdml/dsae_loss.h"
#include "sdml/ap_plan.h"
#include "sdml/host_buffers.h"
#include "sdml/topk_precision.h"
#include "sdml/topk_plan.h"

namespace py = pybind11;

// The sdml op namespace; each op family adds its schemas with TORCH_LIBRARY_FRAGMENT(sdml, m).
TORCH_LIBRARY(sdml, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdml_ext compiled kernels (ops are under torch.ops.sdml)";
  m.attr("torch_version") = std::string(SDML_TORCH_VERSION);
#ifdef SDML_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_bf16_status", &sdml::cpu_bf16_status,
        "This CPU's bf16 units as cosine_topk's precision=\"bf16\" sees them, in one line.");
  m.def("cpu_exact_filter_status", &sdml::cpu_exact_filter_status,
        "Whether cosine_topk's exact mode filters with a bf16 pass on this CPU, in one line.");
  m.def("bf16_topk_output_rounding", &sdml::bf16_output_rounding,
        "rho of the bf16 top-k's bound |S - s| <= rho |S| + D (sdml/topk_precision.h).");
  m.def(
      "bf16_topk_pair_bound",
      [](py::sequence q, py::sequence g, int64_t d) {
        const auto terms = [](py::sequence t) {
          if (py::len(t) != 3) throw py::value_error("bf16_topk_pair_bound: terms are (norm, err, norm_bf16)");
          return sdml::Bf16RowTerms{t[0].cast<double>(), t[1].cast<double>(), t[2].cast<double>()};
        };
        return sdml::bf16_pair_bound(terms(q), terms(g), d);
      },
      py::arg("q"), py::arg("g"), py::arg("d"),
      "D of the bf16 top-k's bound for a query's and an item's row terms (norm, err, norm_bf16).");
  m.def("bf16_topk_threshold", &sdml::bf16_candidate_threshold, py::arg("kappa"), py::arg("D"),
        "The least bf16 score of a possible top-k item, for the k-th best bf16 score kappa and bound D.");
  m.def("cpu_exact_dots_chunk", &sdml::cpu_exact_dots_chunk, py::arg("rows"), py::arg("cols"), py::arg("d"),
        "The chunk of the model that reproduces this process's top-k GEMM at rows x cols x d, bit for bit (0: none).");
  m.def(
      "dsae_loss_cpu_stores",
      []() {
        try {
          return sdml::dsae_loss_cpu_stores();
        } catch (const c10::ValueError& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
        "How the CPU loss kernel writes its input gradients here (ordinary or streaming stores), in one line.");
  m.def("release_cached_host_buffers", &sdml::release_cached_host_buffers,
        "Frees the CPU blocks cached for large kernel outputs; returns the bytes released.");
  m.def(
      "cpu_gemm_choice",
      []() {
        try {
          const sdml::CpuGemmChoice& c = sdml::cpu_gemm_choice();
          py::dict d;
          d["gemm"] = sdml::cpu_gemm_name(c.gemm);
          d["gemm_into_rows"] = sdml::cpu_gemm_name(c.gemm_into_rows);
          d["how"] = c.how;
          if (c.blas_gflops > 0) {
            d["measured_gflops"] =
                py::dict(py::arg("blas") = c.blas_gflops, py::arg("onednn") = c.onednn_gflops,
                         py::arg("avx2") = c.avx2_gflops, py::arg("blas_into_rows") = c.blas_into_rows_gflops,
                         py::arg("onednn_into_rows") = c.onednn_into_rows_gflops,
                         py::arg("avx2_into_rows") = c.avx2_into_rows_gflops);
            d["measured_shape"] = c.shape;
          }
          d["threads"] = c.threads;
          d["machine"] = c.machine;
          d["cache_file"] = c.cache_file.empty() ? py::object(py::none()) : py::object(py::str(c.cache_file));
          d["cache"] = c.cache_note;
          return d;
        } catch (const c10::ValueError& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      "The code running the CPU kernels' float32 tile GEMMs in this process (gemm: blocks with "
      "their own output, cosine_topk; gemm_into_rows: blocks of a wider buffer, the metric ops) and "
      "why (made on the first call: SDML_CPU_GEMM, the cache file, or a measurement of tens of ms).");
  m.def(
      "check_dsae_loss_cuda_limits",
      [](int64_t B, int64_t D, int64_t d, int64_t c, int64_t sm_count) {
        try {
          const sdml::DsaeCudaPlan p = sdml::check_dsae_loss_cuda_limits({B, D, d, c}, sm_count);
          py::dict out;
          out["splits"] = p.splits;
          out["slice"] = p.slice;
          out["threads"] = sdml::kDsaeCudaThreads;
          return out;
        } catch (const c10::ValueError& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("B"), py::arg("D"), py::arg("d"), py::arg("c"), py::arg("sm_count") = 132,
      "Raises the ValueError the CUDA dsae_loss kernels raise for these sizes (x_hat [B, D], h [B, d], "
      "P [d, c]), or returns their launch plan (blocks per row, columns per block) on a device with "
      "sm_count multiprocessors. Runs without a GPU.");
  m.def(
      "topk_margin",
      [](const std::string& precision, const std::string& input, int64_t d) {
        using namespace sdml::topk;
        const InputKind kinds[] = {InputKind::Float64, InputKind::Float32, InputKind::Float16, InputKind::BFloat16};
        const char* names[] = {"float64", "float32", "float16", "bfloat16"};
        InputKind kind = InputKind::Float32;
        bool found = false;
        for (int i = 0; i < 4; ++i)
          if (input == names[i]) kind = kinds[i], found = true;
        if (!found) throw py::value_error("topk_margin: input must be float64, float32, float16 or bfloat16");
        try {
          const Margin m = candidate_margin(parse_precision("cosine_topk", precision), kind, d);
          py::dict out;
          out["delta_low"] = m.delta_low;
          out["delta_det"] = m.delta_det;
          out["margin"] = m.margin;
          return out;
        } catch (const c10::ValueError& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("precision"), py::arg("input"), py::arg("d"),
      "The CUDA cosine_topk's rounding bounds and candidate margin (see csrc/include/sdml/topk_plan.h).");
  m.def(
      "topk_plan",
      [](int64_t nq, int64_t ng, int64_t k, int64_t score_bytes, int64_t workspace_elements, int64_t sm_count,
         int64_t smem_optin, bool fast) {
        try {
          const sdml::topk::Plan p = sdml::topk::plan_topk(nq, ng, k, score_bytes, workspace_elements, sm_count,
                                                           smem_optin, fast);
          py::dict out;
          out["tile_rows"] = p.tile_rows;
          out["block_cols"] = p.block_cols;
          out["ld"] = p.ld;
          out["segments"] = p.segments;
          out["segment_cols"] = p.segment_cols;
          out["sweep"] = p.sweep;
          out["buffer"] = p.buffer;
          out["cap"] = p.cap;
          out["select_smem"] = p.select_smem;
          out["merge_smem"] = p.merge_smem;
          out["fallback"] = p.fallback;
          out["fallback_rows"] = sdml::topk::fallback_rows(nq, ng, workspace_elements);
          return out;
        } catch (const c10::ValueError& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("nq"), py::arg("ng"), py::arg("k"), py::arg("score_bytes"), py::arg("workspace_elements"),
      py::arg("sm_count"), py::arg("smem_optin"), py::arg("fast") = false,
      "The CUDA cosine_topk's launch plan for these sizes and device limits. Runs without a GPU.");
  m.def(
      "ap_rank_plan",
      [](int64_t max_relevant, int64_t score_bytes, int64_t smem_optin) {
        const int64_t cap = sdml::ap::rank_capacity(max_relevant, score_bytes, smem_optin);
        py::dict out;
        out["capacity"] = cap;
        out["smem"] = sdml::ap::rank_smem_bytes(cap, score_bytes);
        out["threads"] = sdml::ap::kRankThreads;
        return out;
      },
      py::arg("max_relevant"), py::arg("score_bytes"), py::arg("smem_optin"),
      "The CUDA AP kernel's relevant-item capacity per row and shared memory. Runs without a GPU.");
  m.def("topk_default_workspace", &sdml::topk::default_workspace_elements, py::arg("free_bytes"),
        py::arg("score_bytes"), "Scores per workspace tile for this much free device memory.");
}
