#!/usr/bin/env bash
# One-shot GPU check, run from the repo root on a GPU host (Python 3.12, torch 2.11, nvcc, no network):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# 1. builds sdml_ext with SDML_CUDA=ON against the host's torch and installs it (not editable) into
#    that Python; every Python step runs with -P, so the installed copy (with its compiled _C) is
#    imported, never the unbuilt sdml_ext/ of this checkout;
# 2. runs the CUDA test cases (they compare against the CPU kernels and float64 references);
# 3. runs the parts of benchmarks/gpu_check_parts.py (strategies give the same models on CUDA; a
#    4,096-d epoch against plain PyTorch; 5 XMedia-like modalities on streams against serial; 200
#    Wikipedia-size epochs), of benchmarks/gpu_check_kernels.py (the fused loss against eager,
#    torch.compile and its bandwidth floor; top-k at 10k x 1M in every precision mode; mAP@all
#    against its GEMM) and benchmarks/gpu_check_retrieval.py (top-k 10k x 100k, mAP@all at
#    23,661^2 and 30,137^2); on request (SDML_GPU_CHECK_STEPS naming them) `memcheck` runs the
#    kernels' CUDA tests under compute-sanitizer and `ncu` profiles the top-k and mAP kernels;
# 4. runs the rest of the test suite (the CPU cases) with the time left;
# 5. writes $OUT (default ./gpu_check_out) -- at most 8 files: gpu_check.json (every number and
#    each step's status), report.txt (the short report, also printed), build.log, tests.log,
#    checks.log -- and exits 1 if anything failed.
#
# Time: the whole run must end within 8 minutes on an H200, the build included. Each step has its
# own limit (a hang stops only that step) and no step may run past the run's budget
# (SDML_GPU_CHECK_BUDGET_S, default 450 s, minus a reserve for the report). The estimates below are
# conservative guesses for an H200 host with 16 cores (nothing has run on a GPU yet); the steps run
# in order of importance, so a slow step costs the least important ones (the CPU test cases) first.
#   step         estimate  limit
#   build           ~60 s   240 s  (45 s clean on 2 cores for sm_90; a slow build may eat the budget)
#   tests_cuda      ~90 s   180 s  (the kernels add ~75 cases against float64 references)
#   strategies      ~15 s    60 s
#   epoch           ~10 s    45 s
#   wiki200         ~50 s    90 s
#   streams         ~15 s    60 s
#   loss            ~45 s   120 s  (torch.compile of the eager expression, two shapes: ~20 s each)
#   topk            ~40 s   150 s  (9 timed configurations of a 10 TFLOP top-k, torch mm+topk, a CPU check)
#   map             ~20 s    90 s
#   retrieval       ~60 s   120 s  (its own estimate: about a minute)
#   tests_cpu      ~120 s   what is left
#   memcheck        ~90 s   180 s  (only when asked: the kernels' CUDA tests under compute-sanitizer)
#   ncu             ~90 s   180 s  (only when asked: ncu of the top-k and mAP kernels -> ncu.log)
# Expected total ~7 minutes; the run ends itself by ~7.7 minutes (budget, a step's 10 s kill grace,
# the report), so give the command a limit of at least 480 s.
#
# A rerun after a fix need not repeat everything: SDML_GPU_CHECK_STEPS="build tests_cuda topk" (any
# of build tests_cuda strategies epoch wiki200 streams loss topk map retrieval tests_cpu, and the
# on-request memcheck ncu) runs only those
# (the build dir build/gpu-check is kept, so a rebuild recompiles only what changed).
#
# SDML_GPU_CHECK_DRY=1: a dry run for a machine without a GPU (tests/test_gpu_check.py runs it):
# no build (the installed sdml_ext is used), no test suite, every part at tiny sizes; CUDA-only
# steps say "skipped: no CUDA".
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
py=${PYTHON:-python3}
dry=${SDML_GPU_CHECK_DRY:-0}
budget=${SDML_GPU_CHECK_BUDGET_S:-450}
reserve=15  # seconds kept for the report
steps=${SDML_GPU_CHECK_STEPS:-build tests_cuda strategies epoch wiki200 streams loss topk map retrieval tests_cpu}
export SDML_GPU_CHECK_DRY=$dry PYTHONUNBUFFERED=1 SDML_SHARED_DATA=${SDML_SHARED_DATA:-}
mkdir -p "$out"
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
    step tests_cuda 180 "$work/tests_cuda.log" "$py" -P -m pytest tests -v -p no:cacheprovider -m cuda
    grep -E "^(FAILED|ERROR)|passed|failed" "$work/tests_cuda.log" | tail -n 15
  fi

  parts="strategies:60 epoch:45 wiki200:90 streams:60"
  if [ "$dry" = 1 ]; then  # one process for all: a torch import and CPU worker start-up, not six
    SHOW=1 step parts 120 "$out/checks.log" "$py" -P benchmarks/gpu_check_parts.py \
      $(for p in $parts; do echo "${p%%:*}"; done) --work "$work"
  else
    for part in $parts; do
      wanted "${part%%:*}" || continue
      SHOW=1 step "${part%%:*}" "${part##*:}" "$out/checks.log" \
        "$py" -P benchmarks/gpu_check_parts.py "${part%%:*}" --work "$work"
    done
  fi

  # The kernels: fused loss, top-k, mAP (benchmarks/gpu_check_kernels.py), each against its
  # alternatives and its floor.
  kernel_parts="loss:120 topk:150 map:90"
  if [ "$dry" = 1 ]; then
    SHOW=1 step kernels 120 "$out/checks.log" "$py" -P benchmarks/gpu_check_kernels.py \
      $(for p in $kernel_parts; do echo "${p%%:*}"; done) --work "$work"
  else
    for part in $kernel_parts; do
      wanted "${part%%:*}" || continue
      SHOW=1 step "${part%%:*}" "${part##*:}" "$out/checks.log" \
        "$py" -P benchmarks/gpu_check_kernels.py "${part%%:*}" --work "$work"
    done
  fi

  # On request only: the kernels' CUDA tests under compute-sanitizer memcheck (into tests.log),
  # and an ncu profile of the top-k and mAP kernels (ncu.log; --clock-control none: the clocks
  # stay as they are).
  if [[ " $steps " == *" memcheck "* ]] && [ "$has_cuda" = 1 ]; then
    step memcheck 180 "$work/tests_memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$py" -P -m pytest tests/test_retrieval.py tests/test_dsae_loss.py -q -p no:cacheprovider -m cuda \
      -k "cuda_topk or fast_modes or ranks_only or average_precision_matches or split_rows or shared_memory"
    grep -E "ERROR SUMMARY|passed|failed" "$work/tests_memcheck.log" | tail -n 5
  fi
  if [[ " $steps " == *" ncu "* ]] && [ "$has_cuda" = 1 ]; then
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
