#!/usr/bin/env bash
# Creates .venv with torch 2.14.1 (CUDA 13.0 build, so the CUDA kernels compile where nvcc is
# present) and builds and installs sdml_ext into it. Safe to rerun: the build dir is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install "torch==${SDML_TORCH_VERSION:-2.14.1}" "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# --no-build-isolation: build against the torch just installed instead of a second copy.
"${pip[@]}" install --no-build-isolation ".[${SDML_EXTRAS:-test}]"
