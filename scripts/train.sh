#!/usr/bin/env bash
# The README's first command: sets up .venv (scripts/setup.sh), then trains SDML on the embedded
# UCI digits with the parallel strategy and prints the mAP table. Arguments go to
# `python -m sdml_ext.train` (see --help), e.g. `bash scripts/train.sh --epochs 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The package chooses OpenMP's wait policy itself (sdml_ext/waitpolicy.py); OMP_WAIT_POLICY overrides it.
exec .venv/bin/python -m sdml_ext.train "$@"
