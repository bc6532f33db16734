#!/usr/bin/env bash
# Creates .venv with torch 2.14.1 (CUDA 13.0 build, so the CUDA kernels compile where nvcc is
# present) and builds sdml_ext in place (an editable install: the compiled extension lands in
# sdml_ext/ of this checkout, so `.venv/bin/python -m sdml_ext.train` works from the repository
# root and from anywhere else). Safe to rerun: a rerun skips what is done and recompiles only
# what changed. The full build log goes to build/setup-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_version=${SDML_TORCH_VERSION:-2.14.1}
step() { printf '\n== [%s/3] %s\n' "$1" "$2" >&2; }

step 1 "Python environment .venv"
if [ -x .venv/bin/python ]; then
  echo "   .venv exists ($(.venv/bin/python --version))" >&2
else
  "$python" -m venv .venv
  echo "   created .venv with $(.venv/bin/python --version)" >&2
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

step 2 "torch $torch_version and the build tools"
if .venv/bin/python - "$torch_version" 2>/dev/null <<'PY'
import sys, torch, scikit_build_core, pybind11, ninja
sys.exit(torch.__version__.split("+")[0] != sys.argv[1])
PY
then
  echo "   already installed" >&2
else
  echo "   the CUDA build of torch is a large download (several GB): pip shows its progress" >&2
  # Not piped through a filter: pip draws its progress bars only on a terminal.
  "${pip[@]}" install "torch==$torch_version" "scikit-build-core>=0.10" "pybind11>=2.12" ninja
fi

step 3 "build sdml_ext in place (C++ kernels, plus CUDA kernels when nvcc is found) and its dependencies"
# --no-build-isolation: build against the torch just installed instead of a second copy.
# -v shows the build; its progress (the dependencies pip fetches, scikit-build-core's *** stages, CMake's sdml_ext lines,
# ninja's [n/N] steps, compiler errors) is printed as it happens, all of it goes to the log.
mkdir -p build
log=build/setup-build.log
set +e
"${pip[@]}" install -v --no-build-isolation -e ".[${SDML_EXTRAS:-test}]" </dev/null 2>&1 | tee "$log" \
  | { grep --line-buffered -E '^\s*(Collecting |\*\*\* |-- sdml_ext|\[[0-9]+/[0-9]+\] |CMake Error|ERROR|Successfully installed)|(error|warning):' \
      | sed -u 's/^ */   /' >&2; true; }
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "   the build failed (pip exit status $status); the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit "$status"
fi
echo "   built: $(.venv/bin/python -c 'import sdml_ext; print("sdml_ext", sdml_ext.__version__, sdml_ext.build_info())')" >&2
