#!/usr/bin/env bash
# One-shot GPU check, run from the repo root on a GPU host (Python 3.12, torch 2.11, nvcc, no network):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# 1. builds sdml_ext with SDML_CUDA=ON against the host's torch and installs it (not editable) into
#    that Python; every Python step runs with -P, so the installed copy (with its compiled _C) is
#    imported, never the unbuilt sdml_ext/ of this checkout;
# 2. runs the CUDA test cases (they compare against the CPU kernels, float64 references and the CPU
#    result of every training, evaluation and search path);
# 3. runs the README's commands as a user types them, in a scratch directory: python -m sdml_ext.train
#    --out runs/digits (default dataset, auto device), python -m sdml_ext.evaluate runs/digits, the
#    search section's build and query, and torchrun --standalone --nproc-per-node=2 -m sdml_ext.train
#    (both ranks on the one GPU); each passes or fails on its own line of the report;
# 4. runs the training parts of benchmarks/gpu_check_parts.py with their targets: a 4,096-d epoch on
#    CUDA graphs, on eager steps and as a plain PyTorch loop (graphs <= 0.2x plain); 200 Wikipedia-
#    shape epochs (<= 2 s for both modalities); 5 XMedia-width modalities on streams against serial
#    (>= 3x); graphs against eager (the same models); the strategies against each other;
# 5. runs the in-process CUDA tests (kernels, graph capture, strategies) under compute-sanitizer
#    memcheck, then the kernel parts of benchmarks/gpu_check_kernels.py (the fused loss against
#    eager, torch.compile and its bandwidth floor; top-k at 10k x 1M in every precision mode against
#    torch mm+topk; mAP@all against its GEMM) and benchmarks/gpu_check_retrieval.py (top-k 10k x
#    100k, mAP@all at 23,661^2 and 30,137^2); on request (SDML_GPU_CHECK_STEPS naming it) `ncu`
#    profiles the selection, merge, AP and loss kernels (ncu.log);
# 6. runs the rest of the test suite (the CPU cases) with the time left;
# 7. writes $OUT (default ./gpu_check_out) -- at most 8 files: gpu_check.json (every number and
#    each step's status), report.txt (the short report, also printed), build.log, tests.log,
#    checks.log -- and exits 1 if anything failed.
#
# Time: the whole run must end within 7 minutes on an H200, the build included. Each step has its
# own limit (a hang stops only that step) and no step may run past the run's budget
# (SDML_GPU_CHECK_BUDGET_S, default 420 s, minus a reserve for the report). The estimates below are
# guesses for an H200 host with 16 cores (the first run: build 32 s, the whole check 117 s, when no
# training path could start); the steps run in order of importance, so a slow step costs the least
# important ones (the CPU test cases, then the kernel timings) first.
#   step                 estimate  limit
#   build                   ~35 s   240 s
#   tests_cuda              ~90 s   240 s  (subprocess runs: train, resume, add-modality, torchrun, search)
#   readme_train            ~20 s   120 s  (6 views x 40 epochs on streams; evaluation on the CPU)
#   readme_evaluate         ~10 s    60 s
#   readme_search_build      ~8 s    60 s
#   readme_search_query      ~8 s    60 s
#   readme_torchrun         ~25 s   150 s
#   epoch                   ~10 s    45 s
#   wiki200                 ~20 s    60 s
#   streams                 ~20 s    60 s
#   graphs                  ~15 s    60 s
#   strategies              ~15 s    60 s
#   memcheck                ~90 s   180 s
#   loss                    ~45 s   120 s  (torch.compile of the eager expression, two shapes)
#   topk                    ~40 s   150 s  (9 timed configurations of a 10 TFLOP top-k, torch mm+topk)
#   map                     ~20 s    90 s
#   retrieval               ~60 s   120 s
#   tests_cpu              what is left
#   ncu                     ~90 s   180 s  (only when asked)
# Give the command a limit of at least 460 s (the budget, a step's 10 s kill grace, the report).
# The whole list does not fit one budget: the first call on a fresh host should be the default
# steps; the kernel timings and retrieval may then need a second call such as
# SDML_GPU_CHECK_STEPS="build loss topk map retrieval" (the build is cached in build/gpu-check).
#
# A rerun after a fix need not repeat everything: SDML_GPU_CHECK_STEPS="build tests_cuda topk" (any
# of the steps above) runs only those (the build dir build/gpu-check is kept, so a rebuild recompiles
# only what changed; a README step whose predecessor is not run is skipped). SDML_CUDA_GRAPHS=0 runs
# every training step on eager CUDA steps instead of graphs.
#
# SDML_GPU_CHECK_DRY=1: a dry run for a machine without a GPU (tests/test_gpu_check.py runs it):
# no build (the installed sdml_ext is used), no test suite, the README's commands with --epochs 1
# and two of the six views,
# every part at tiny sizes; CUDA-only steps say "skipped: no CUDA".
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
py=${PYTHON:-python3}
dry=${SDML_GPU_CHECK_DRY:-0}
budget=${SDML_GPU_CHECK_BUDGET_S:-420}
reserve=15  # seconds kept for the report
all_steps="build tests_cuda readme_train readme_evaluate readme_search_build readme_search_query readme_torchrun
  epoch wiki200 streams graphs strategies memcheck loss topk map retrieval tests_cpu"
steps=$(echo ${SDML_GPU_CHECK_STEPS:-$all_steps})  # one line, single spaces
export SDML_GPU_CHECK_DRY=$dry PYTHONUNBUFFERED=1 SDML_SHARED_DATA=${SDML_SHARED_DATA:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the README steps run in another directory
case $py in /*) ;; */*) py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") ;; esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: >"$work/status.tsv"
SECONDS=0

record() {  # NAME RC SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/status.tsv"
}

# step NAME CAP LOG COMMAND...: runs COMMAND for at most min(CAP, budget left) seconds, its output
# appended to LOG (and shown when SHOW=1), and records its exit status (124/137: timed out).
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$(( budget - reserve - SECONDS ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    echo "== $name: skipped: out of time"
    record "$name" skipped 0 0 "out of time (budget ${budget} s)"
    return 1
  fi
  echo "== $name (limit ${limit} s, ${SECONDS} s so far)"
  local start=$SECONDS rc
  if [ "${SHOW:-0}" = 1 ]; then
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
  fi
  record "$name" "$rc" "$(( SECONDS - start ))" "$limit" ""
  return "$rc"
}

skip() {  # NAME REASON
  echo "== $1: skipped: $2"
  record "$1" skipped 0 0 "$2"
}

wanted() {  # NAME: is the step in SDML_GPU_CHECK_STEPS? (says so when not)
  [[ " $steps " == *" $1 "* ]] && return 0
  skip "$1" "not in SDML_GPU_CHECK_STEPS"
  return 1
}

has_cuda=$("$py" -P -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

echo "== device"
if [ "$has_cuda" = 1 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/device.txt"
else
  echo "no CUDA" | tee "$work/device.txt"
fi

built=1
if [ "$dry" = 1 ]; then
  skip build "dry run: the installed sdml_ext is used"
elif wanted build; then
  if ! SDML_CUDA=ON SDML_CUDA_ARCHS=${SDML_CUDA_ARCHS:-90} step build 240 "$out/build.log" \
      "$py" -m pip install -v --no-build-isolation --no-deps --force-reinstall \
      --config-settings=build-dir=build/gpu-check .; then
    tail -n 40 "$out/build.log"
    built=0
  fi
fi
# -P: the repository root is not put on sys.path, so the installed package (with _C) is imported.
"$py" -P -c "import json, sdml_ext; print(json.dumps(sdml_ext.build_info()))" >"$work/build_info.json" 2>>"$out/checks.log" \
  || built=0

if [ "$built" = 1 ]; then
  if [ "$dry" = 1 ]; then
    skip tests_cuda "dry run (the test suite runs this script)"
  elif [ "$has_cuda" != 1 ]; then
    skip tests_cuda "no CUDA"
  elif wanted tests_cuda; then
    step tests_cuda 240 "$work/tests_cuda.log" "$py" -P -m pytest tests -v -p no:cacheprovider -m cuda
    grep -E "^(FAILED|ERROR)|passed|failed" "$work/tests_cuda.log" | tail -n 15
  fi

  # ---- the README's commands, as a user types them (training and search sections) ---------------
  # Run in a scratch directory with the installed package (not this checkout), in order: each
  # needs the one before. The dry run adds --epochs 1 --modalities fou,kar (the two the search
  # commands use; the CPU would take minutes otherwise).
  user="$work/user"
  mkdir -p "$user"
  extra=()
  [ "$dry" = 1 ] && extra=(--epochs 1 --modalities fou,kar)
  readme() {  # NAME CAP NEEDS COMMAND...: a README step, skipped when the step it needs failed
    local name=$1 cap=$2 needs=$3
    shift 3
    wanted "$name" || return 1
    if [ -n "$needs" ] && ! grep -q "^$needs	0	" "$work/status.tsv"; then
      skip "$name" "needs $needs, which did not pass"
      return 1
    fi
    (cd "$user" && SHOW=1 step "$name" "$cap" "$out/checks.log" "$@")
  }
  if readme readme_train 120 "" "$py" -m sdml_ext.train --out runs/digits "${extra[@]}"; then
    # auto device: CUDA where there is one (the run prints where it trains)
    if [ "$has_cuda" = 1 ] && ! grep -q "on cuda:0" "$out/checks.log"; then
      record readme_train_device 1 0 0 "python -m sdml_ext.train did not train on cuda:0"
    fi
  fi
  readme readme_evaluate 60 readme_train "$py" -m sdml_ext.evaluate runs/digits
  readme readme_search_build 60 readme_train "$py" -m sdml_ext.search build runs/digits --modality fou \
    --dataset mfeat --out runs/digits-fou.index
  readme readme_search_query 60 readme_search_build "$py" -m sdml_ext.search query runs/digits-fou.index \
    --modality kar --dataset mfeat -k 10 --out hits.json
  # torchrun is python -m torch.distributed.run (the README says so): the same interpreter for sure.
  # One GPU: both ranks train on cuda:0.
  readme readme_torchrun 150 "" "$py" -m torch.distributed.run --standalone --nproc-per-node=2 \
    -m sdml_ext.train --dataset mfeat --out runs/dist "${extra[@]}"

  # ---- training parts (graphs, strategies, streams) and the memory checker -----------------------
  train_parts="epoch:45 wiki200:60 streams:60 graphs:60 strategies:60"
  # The kernels (benchmarks/gpu_check_kernels.py): fused loss, top-k, mAP, each against its
  # alternatives and its floor.
  kernel_parts="loss:120 topk:150 map:90"
  run_parts() {  # SCRIPT PART:CAP ...
    local script=$1 part
    shift
    for part in "$@"; do
      wanted "${part%%:*}" || continue
      SHOW=1 step "${part%%:*}" "${part##*:}" "$out/checks.log" \
        "$py" -P "benchmarks/$script" "${part%%:*}" --work "$work"
    done
  }
  if [ "$dry" = 1 ]; then  # one process per script: a torch import and CPU worker start-up, not eight
    SHOW=1 step parts 180 "$out/checks.log" "$py" -P benchmarks/gpu_check_parts.py \
      $(for p in $train_parts; do echo "${p%%:*}"; done) --work "$work"
    SHOW=1 step kernels 120 "$out/checks.log" "$py" -P benchmarks/gpu_check_kernels.py \
      $(for p in $kernel_parts; do echo "${p%%:*}"; done) --work "$work"
  else
    run_parts gpu_check_parts.py $train_parts
  fi

  # The CUDA tests that run in this process (kernels, graph capture, strategies) under memcheck:
  # kernels without PyTorch's caching allocator (every allocation exact, so an overrun is seen),
  # graphs with it (capture needs it). Exit 99 = memcheck found errors; 1 = a test failed.
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ "$dry" = 1 ]; then
    skip memcheck "dry run"
  elif [ "$has_cuda" != 1 ]; then
    skip memcheck "no CUDA"
  elif [ -z "$sanitizer" ]; then
    skip memcheck "compute-sanitizer not found"
  elif wanted memcheck; then
    ms="$sanitizer --tool memcheck --target-processes application-only --error-exitcode 99 --print-limit 20"
    step memcheck 180 "$work/tests_memcheck.log" bash -c "
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 $ms $py -P -m pytest -q -p no:cacheprovider -m cuda \
        tests/test_dsae_loss.py tests/test_retrieval.py; a=\$?
      $ms $py -P -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graph_step.py tests/test_train_strategies.py; b=\$?
      echo \"memcheck: kernels rc \$a, training rc \$b\"; [ \$a = 0 ] && [ \$b = 0 ]"
    grep -E "^(FAILED|ERROR)|ERROR SUMMARY|passed|failed|memcheck: " "$work/tests_memcheck.log" | tail -n 15
  fi

  if [ "$dry" != 1 ]; then
    run_parts gpu_check_kernels.py $kernel_parts
  fi
  # On request only: an ncu profile of the selection, merge, AP and loss kernels (ncu.log;
  # --clock-control none: the clocks stay as they are).
  if [[ " $steps " == *" ncu "* ]] && [ "$has_cuda" = 1 ] && [ "$dry" != 1 ]; then
    step ncu 180 "$out/ncu.log" ncu --clock-control none --target-processes all \
      --kernel-name "regex:select_segments|merge_lists|ap_ranks|count_relevant|dsae_" --launch-count 12 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats \
      "$py" -P benchmarks/gpu_check_kernels.py profile --work "$work"
  fi

  if [ "$has_cuda" != 1 ]; then
    skip retrieval "no CUDA"
  elif [ "$dry" = 1 ]; then
    skip retrieval "dry run (gpu_check_retrieval.py has full sizes only)"
  elif wanted retrieval; then
    SHOW=1 step retrieval 120 "$out/checks.log" "$py" -P benchmarks/gpu_check_retrieval.py --out "$work/retrieval"
  fi

  if [ "$dry" = 1 ]; then
    skip tests_cpu "dry run (the test suite runs this script)"
  elif wanted tests_cpu; then
    step tests_cpu 600 "$work/tests_cpu.log" "$py" -P -m pytest tests -q -p no:cacheprovider -m "not cuda"
    grep -E "^(FAILED|ERROR)|passed|failed" "$work/tests_cpu.log" | tail -n 15
  fi
else
  echo "GPU CHECK: BUILD FAILED"
  record build_info 1 0 0 "sdml_ext does not import after the build: see build.log and checks.log"
fi

# One tests.log; no file over the 16 MiB a returned file may have.
cat "$work"/tests_*.log >"$out/tests.log" 2>/dev/null || true
[ -s "$out/tests.log" ] || rm -f "$out/tests.log"
for f in "$out"/*.log; do
  [ -s "$f" ] || { rm -f "$f"; continue; }
  [ "$(stat -c %s "$f")" -gt 15000000 ] && { tail -c 15000000 "$f" >"$f.tail"; mv "$f.tail" "$f"; }
done
echo "== report (${SECONDS} s so far)"
"$py" -P benchmarks/gpu_check_parts.py report --work "$work" --out "$out"
