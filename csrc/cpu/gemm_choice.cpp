// The float32 tile GEMM of the CPU kernels: MKL/BLAS, oneDNN or our AVX2 kernel, chosen by timing
// them on this machine (see sdml/cpu_gemm.h), with a per-process and an on-disk cache.
//
// at::parallel_for runs the calibration on every thread, as the kernels run their tiles: this
// file is compiled with -fopenmp (CMakeLists.txt).
#include "sdml/cpu_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unistd.h>
#include <vector>

#include "sdml/cpu_blas.h"
#include "sdml/panel_gemm.h"

namespace sdml {
namespace {

namespace fs = std::filesystem;

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// torch's oneDNN linear op (y = x w^T), where this torch has it for CPU tensors.
const c10::TypedOperatorHandle<LinearFn>* onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearFn>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return op->typed<LinearFn>();
  }();
  return handle ? &*handle : nullptr;
}

// The calibrated GEMM: a query tile of the kernels' largest size against one gallery block, at an
// embedding size typical of the models (the rates' order, not their values, is what is used).
constexpr int64_t kRows = 256, kCols = 1024, kDepth = 256;
constexpr int kRounds = 5;        // interleaved rounds; each keeps its best (short bursts of noise pass)
constexpr int kGemmsPerThread = 2;  // per round (~1-3 ms per GEMM and thread)
constexpr std::string_view kHeader = "sdml_ext cpu gemm calibration v3";
constexpr std::string_view kFileName = "cpu_gemm_v3.txt";  // v3: our AVX2 kernel measured too
// The top-k blocks run on oneDNN or our kernel (the faster) unless BLAS measures more than
// 1 / kPositionFreePreference faster.
constexpr double kPositionFreePreference = 0.95;

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown CPU";
}

std::string isa() {
  std::string out;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  for (const auto& [name, has] : {std::pair<const char*, bool>{"avx2", __builtin_cpu_supports("avx2")},
                                  {"fma", __builtin_cpu_supports("fma")},
                                  {"avx512f", __builtin_cpu_supports("avx512f")},
                                  {"avx512bf16", __builtin_cpu_supports("avx512bf16")}}) {
    if (has) out += (out.empty() ? "" : ",") + std::string(name);
  }
#endif
  return out.empty() ? "baseline" : out;
}

// What a cached result depends on: a line without '\n'.
std::string machine_key(int threads) {
  std::ostringstream key;
  key << "cpu=" << cpu_model() << ";isa=" << isa() << ";torch=" << SDML_TORCH_VERSION << ";onednn="
      << (onednn_linear() ? 1 : 0) << ";threads=" << threads;
  std::string s = key.str();
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

std::optional<fs::path> cache_dir() {
  if (const char* dir = std::getenv("SDML_CACHE_DIR"); dir && *dir) {
    if (std::string_view(dir) == "off") return std::nullopt;
    return fs::path(dir);
  }
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return fs::path(xdg) / "sdml_ext";
  if (const char* home = std::getenv("HOME"); home && *home) return fs::path(home) / ".cache" / "sdml_ext";
  return std::nullopt;
}

std::string gflops_text(double rate) {
  std::ostringstream out;
  out.precision(6);
  out << rate;
  return out.str();
}

// Reads a cached choice for `key`; nullopt with `why` when the file is missing or unusable.
std::optional<CpuGemmChoice> read_cache(const fs::path& file, const std::string& key, std::string& why) {
  std::error_code ec;
  if (!fs::exists(file, ec)) {
    why = "none yet";
    return std::nullopt;
  }
  std::ifstream in(file, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) {
    why = "ignored: unreadable";
    return std::nullopt;
  }
  std::istringstream lines(text);
  std::string line;
  std::vector<std::pair<std::string, std::string>> fields;
  if (!std::getline(lines, line) || line != kHeader) {
    why = "ignored: not a calibration file of this version";
    return std::nullopt;
  }
  while (std::getline(lines, line)) {
    const auto eq = line.find('=');
    if (eq == std::string::npos) {
      why = "ignored: corrupt";
      return std::nullopt;
    }
    fields.emplace_back(line.substr(0, eq), line.substr(eq + 1));
  }
  const auto field = [&](const char* name) -> std::optional<std::string> {
    for (const auto& [k, v] : fields)
      if (k == name) return v;
    return std::nullopt;
  };
  const auto number = [&](const char* name) -> double {
    const auto v = field(name);
    if (!v || v->empty()) return NAN;
    char* end = nullptr;
    const double x = std::strtod(v->c_str(), &end);
    return end && *end == '\0' ? x : NAN;
  };
  const auto machine = field("machine"), gemm = field("gemm"), gemm_rows = field("gemm_into_rows"),
             shape = field("shape");
  const double blas = number("blas_gflops"), onednn = number("onednn_gflops");
  const double blas_rows = number("blas_into_rows_gflops"), onednn_rows = number("onednn_into_rows_gflops");
  const double avx2 = number("avx2_gflops"), avx2_rows = number("avx2_into_rows_gflops");
  const auto rate_ok = [](double r, bool positive) { return std::isfinite(r) && (positive ? r > 0 : r >= 0); };
  const auto name_ok = [](const std::optional<std::string>& g) {
    return g && (*g == "blas" || *g == "onednn" || *g == "avx2");
  };
  if (!machine || !shape || !name_ok(gemm) || !name_ok(gemm_rows) || !rate_ok(blas, true) || !rate_ok(onednn, false) ||
      !rate_ok(blas_rows, true) || !rate_ok(onednn_rows, false) || !rate_ok(avx2, false) || !rate_ok(avx2_rows, false)) {
    why = "ignored: corrupt";
    return std::nullopt;
  }
  if (*machine != key) {
    why = "ignored: written for another machine, torch or thread count";
    return std::nullopt;
  }
  CpuGemmChoice choice;
  const auto parsed = [](const std::string& g) {
    return g == "onednn" ? CpuGemm::OneDnn : g == "avx2" ? CpuGemm::Avx2 : CpuGemm::Blas;
  };
  choice.gemm = parsed(*gemm);
  choice.gemm_into_rows = parsed(*gemm_rows);
  // A choice must name code this process has and whose rate was measured.
  const auto usable = [](CpuGemm g, double onednn_rate, double avx2_rate) {
    if (g == CpuGemm::OneDnn) return onednn_rate > 0 && onednn_linear() != nullptr;
    if (g == CpuGemm::Avx2) return avx2_rate > 0 && panel_gemm::available();
    return true;
  };
  if (!usable(choice.gemm, onednn, avx2) || !usable(choice.gemm_into_rows, onednn_rows, avx2_rows)) {
    why = "ignored: corrupt";
    return std::nullopt;
  }
  choice.blas_gflops = blas;
  choice.onednn_gflops = onednn;
  choice.blas_into_rows_gflops = blas_rows;
  choice.onednn_into_rows_gflops = onednn_rows;
  choice.avx2_gflops = avx2;
  choice.avx2_into_rows_gflops = avx2_rows;
  choice.shape = *shape;
  return choice;
}

// Writes the choice atomically (a temporary file renamed over the old one); returns what happened.
std::string write_cache(const fs::path& file, const CpuGemmChoice& choice) {
  std::error_code ec;
  fs::create_directories(file.parent_path(), ec);
  const fs::path tmp = file.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << kHeader << "\nmachine=" << choice.machine << "\ngemm=" << cpu_gemm_name(choice.gemm)
        << "\ngemm_into_rows=" << cpu_gemm_name(choice.gemm_into_rows)
        << "\nblas_gflops=" << gflops_text(choice.blas_gflops) << "\nonednn_gflops=" << gflops_text(choice.onednn_gflops)
        << "\nblas_into_rows_gflops=" << gflops_text(choice.blas_into_rows_gflops)
        << "\nonednn_into_rows_gflops=" << gflops_text(choice.onednn_into_rows_gflops)
        << "\navx2_gflops=" << gflops_text(choice.avx2_gflops)
        << "\navx2_into_rows_gflops=" << gflops_text(choice.avx2_into_rows_gflops) << "\nshape=" << choice.shape
        << "\n";
    out.close();
    if (!out) {
      fs::remove(tmp, ec);
      return "not written: cannot write to " + file.parent_path().string();
    }
  }
  fs::rename(tmp, file, ec);
  if (ec) {
    fs::remove(tmp, ec);
    return "not written: " + ec.message();
  }
  return "written";
}

// Deterministic values in [-1, 1) (the global RNG is the user's and stays untouched).
at::Tensor filled(int64_t rows, int64_t cols, uint64_t seed) {
  at::Tensor t = at::empty({rows, cols}, at::kFloat);
  float* p = t.mutable_data_ptr<float>();
  uint64_t x = seed;
  for (int64_t i = 0; i < rows * cols; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    p[i] = float(int32_t(x >> 32)) * (1.0f / 2147483648.0f);
  }
  return t;
}

// Best aggregate rate (GFLOP/s) of each GEMM and use over kRounds interleaved rounds, every
// thread running kGemmsPerThread tile GEMMs per round; the rates of code this process lacks are 0.
// Our kernel's rates are of its uses: the gallery block packed before the clock (cosine_topk
// packs the gallery once per search, the metric tiles once per call for all their tiles).
void measure(CpuGemmChoice& choice) {
  const int threads = at::get_num_threads();
  const at::Tensor a = filled(kRows, kDepth, 1), b = filled(kCols, kDepth, 2);
  at::Tensor packed;
  if (panel_gemm::available()) {
    packed = at::empty({panel_gemm::packed_floats(kCols, kDepth)}, at::kFloat);
    panel_gemm::pack(b.const_data_ptr<float>(), kDepth, nullptr, 0, kCols, kCols, kDepth, packed.mutable_data_ptr<float>());
  }
  std::vector<at::Tensor> outs, wide;
  for (int t = 0; t < threads; ++t) {
    outs.push_back(at::empty({kRows, kCols}, at::kFloat));
    wide.push_back(at::empty({kRows, 4 * kCols}, at::kFloat));  // a block of a wider tile
  }
  const auto seconds = [&](CpuGemm gemm, bool into_rows, int gemms) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      const SingleThreadedBlas one_thread;
      for (int64_t t = begin; t < end; ++t) {
        at::Tensor block = wide[t].narrow(1, kCols, kCols);
        for (int i = 0; i < gemms; ++i) {
          if (gemm == CpuGemm::Avx2) {
            at::Tensor& o = into_rows ? block : outs[t];
            panel_gemm::scores(a.const_data_ptr<float>(), kRows, kDepth, packed.const_data_ptr<float>(), kCols, kDepth,
                               o.mutable_data_ptr<float>(), o.stride(0));
          } else if (!into_rows) {
            cpu_gemm_nt(gemm, a, b, outs[t]);
          } else if (const at::Tensor s = cpu_gemm_nt(gemm, a, b, block); !s.is_same(block)) {
            block.copy_(s);
          }
        }
      }
    });
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<CpuGemm> gemms{CpuGemm::Blas};
  if (onednn_linear()) gemms.push_back(CpuGemm::OneDnn);
  if (panel_gemm::available()) gemms.push_back(CpuGemm::Avx2);
  for (const CpuGemm gemm : gemms) seconds(gemm, false, 1);  // warm-up: oneDNN builds its kernel here
  const double flops = 2.0 * kRows * kCols * kDepth * kGemmsPerThread * threads;
  const auto best_rate = [&](CpuGemm gemm, bool into_rows) -> double& {
    if (gemm == CpuGemm::OneDnn) return into_rows ? choice.onednn_into_rows_gflops : choice.onednn_gflops;
    if (gemm == CpuGemm::Avx2) return into_rows ? choice.avx2_into_rows_gflops : choice.avx2_gflops;
    return into_rows ? choice.blas_into_rows_gflops : choice.blas_gflops;
  };
  for (int round = 0; round < kRounds; ++round) {
    for (const bool into_rows : {false, true}) {
      for (const CpuGemm gemm : gemms) {
        double& best = best_rate(gemm, into_rows);
        best = std::max(best, flops / seconds(gemm, into_rows, kGemmsPerThread) / 1e9);
      }
    }
  }
  // Top-k blocks prefer oneDNN or our kernel unless BLAS is clearly faster: they round a product
  // the same wherever it lies in the output, so a query's top-k scores do not depend on its tile,
  // and precision="bf16" can re-score its candidates to the exact mode's very bits.
  const CpuGemm free_gemm = choice.avx2_gflops > choice.onednn_gflops ? CpuGemm::Avx2 : CpuGemm::OneDnn;
  const double free_rate = std::max(choice.avx2_gflops, choice.onednn_gflops);
  choice.gemm = free_rate > 0 && free_rate >= kPositionFreePreference * choice.blas_gflops ? free_gemm : CpuGemm::Blas;
  // Into a wider buffer: the fastest.
  choice.gemm_into_rows = CpuGemm::Blas;
  for (const CpuGemm gemm : gemms)
    if (best_rate(gemm, true) > best_rate(choice.gemm_into_rows, true)) choice.gemm_into_rows = gemm;
  choice.shape = std::to_string(kRows) + " x " + std::to_string(kCols) + " x " + std::to_string(kDepth);
}

CpuGemmChoice decide() {
  const char* env = std::getenv("SDML_CPU_GEMM");
  const std::string mode = env && *env ? env : "auto";
  TORCH_CHECK_VALUE(mode == "auto" || mode == "measure" || mode == "blas" || mode == "onednn" || mode == "avx2",
                    "SDML_CPU_GEMM must be auto, measure, blas, onednn or avx2, got \"", mode, "\"");
  CpuGemmChoice choice;
  choice.threads = at::get_num_threads();
  choice.machine = machine_key(choice.threads);
  if (mode == "blas" || mode == "onednn" || mode == "avx2") {
    const bool onednn = mode == "onednn" && onednn_linear(), avx2 = mode == "avx2" && panel_gemm::available();
    choice.gemm = choice.gemm_into_rows = onednn ? CpuGemm::OneDnn : avx2 ? CpuGemm::Avx2 : CpuGemm::Blas;
    choice.how = "SDML_CPU_GEMM=" + mode;
    if (mode == "onednn" && !onednn) choice.how += " (this torch has no oneDNN: blas)";
    if (mode == "avx2" && !avx2) choice.how += " (this CPU has no AVX2 and FMA: blas)";
    choice.cache_note = "not used";
    return choice;
  }
  const std::optional<fs::path> dir = cache_dir();
  if (dir) choice.cache_file = (*dir / kFileName).string();
  if (dir && mode == "auto") {
    std::string why;
    if (std::optional<CpuGemmChoice> cached = read_cache(choice.cache_file, choice.machine, why)) {
      cached->how = "cached";
      cached->threads = choice.threads;
      cached->machine = choice.machine;
      cached->cache_file = choice.cache_file;
      cached->cache_note = "read";
      return *cached;
    }
    choice.cache_note = why;
  }
  measure(choice);
  choice.how = "measured";
  if (dir) {
    const std::string written = write_cache(choice.cache_file, choice);
    choice.cache_note = choice.cache_note.empty() ? written : choice.cache_note + "; " + written;
  } else {
    choice.cache_note = "off";
  }
  return choice;
}

}  // namespace

const char* cpu_gemm_name(CpuGemm gemm) {
  return gemm == CpuGemm::OneDnn ? "onednn" : gemm == CpuGemm::Avx2 ? "avx2" : "blas";
}

const CpuGemmChoice& cpu_gemm_choice() {
  // A function-local static: initialised once, by the first caller, others wait; an exception
  // (a bad SDML_CPU_GEMM) leaves it uninitialised, so every call reports it.
  static const CpuGemmChoice choice = decide();
  return choice;
}

at::Tensor cpu_gemm_nt(CpuGemm gemm, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  if (gemm == CpuGemm::OneDnn && a.scalar_type() == at::kFloat) {
    if (const auto* linear = onednn_linear())
      return linear->call(a, b, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  if (gemm == CpuGemm::Avx2 && a.scalar_type() == at::kFloat && panel_gemm::available() && a.stride(1) == 1 &&
      b.stride(1) == 1 && out.stride(1) == 1 && out.size(0) == a.size(0) && out.size(1) == b.size(0) &&
      b.size(1) == a.size(1)) {
    // b packed per call into the thread's scratch (kept: the calls come block after block).
    const int64_t rows = a.size(0), cols = b.size(0), d = a.size(1);
    thread_local std::vector<float> packed;
    packed.resize(size_t(panel_gemm::packed_floats(cols, d)));
    panel_gemm::pack(b.const_data_ptr<float>(), b.stride(0), nullptr, 0, cols, cols, d, packed.data());
    panel_gemm::scores(a.const_data_ptr<float>(), rows, a.stride(0), packed.data(), cols, d,
                       out.mutable_data_ptr<float>(), out.stride(0));
    return out;
  }
  at::mm_out(out, a, b.t());
  return out;
}

}  // namespace sdml
