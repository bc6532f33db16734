#!/usr/bin/env bash
# One-shot GPU check, run from the repo root on a GPU host (Python 3.12, torch 2.11, nvcc, no network):
#   bash benchmarks/gpu_check.sh
# Builds with SDML_CUDA=ON against the host's torch, runs the whole test suite (the CUDA cases
# compare against the CPU op and the float64 reference), runs the CUDA benchmarks and prints a
# short report. Logs and JSON go to $OUT (default ./gpu_check_out). Budget: < 8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
py=${PYTHON:-python3}
mkdir -p "$out"
export SDML_SHARED_DATA=${SDML_SHARED_DATA:-}

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

echo "== build (SDML_CUDA=ON, sm ${SDML_CUDA_ARCHS:-90})"
start=$(date +%s)
if ! SDML_CUDA=ON SDML_CUDA_ARCHS=${SDML_CUDA_ARCHS:-90} "$py" -m pip install --no-build-isolation --no-deps \
    --config-settings=build-dir=build/gpu-check . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "GPU CHECK: BUILD FAILED"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
# -P: do not put the repo root on sys.path, so the installed package (with _C) is imported.
"$py" -P -c "import json, sdml_ext; print(json.dumps(sdml_ext.build_info()))" | tee "$out/build_info.json"

echo "== tests"
"$py" -P -m pytest tests -q -p no:cacheprovider --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_rc=$?
grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -30

echo "== CUDA benchmarks"
"$py" -P -m pytest benchmarks -q -p no:cacheprovider -k cuda --benchmark-json="$out/bench.json" \
  --benchmark-columns=median,iqr,min --benchmark-group-by=group >"$out/bench.log" 2>&1
bench_rc=$?
grep -E "^test_|passed|failed|Error" "$out/bench.log" | tail -40

echo "== retrieval at full size"
"$py" -P benchmarks/gpu_check_retrieval.py --out "$out" 2>&1 | tee "$out/retrieval.log" | tail -30
retrieval_rc=${PIPESTATUS[0]}

echo "== report"
"$py" -P benchmarks/report.py "$out/bench.json" || true
echo "GPU CHECK: tests rc=$tests_rc, benchmarks rc=$bench_rc, retrieval rc=$retrieval_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || retrieval_rc != 0 ))
