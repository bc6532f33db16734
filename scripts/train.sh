#!/usr/bin/env bash
# The README's first command: sets up .venv (scripts/setup.sh), then trains SDML on the embedded
# UCI digits with the parallel strategy and prints the mAP table. Arguments go to
# `python -m sdml_ext.train` (see --help), e.g. `bash scripts/train.sh --epochs 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -P: do not put the repo root on sys.path, so the installed package (with _C) is imported.
exec .venv/bin/python -P -m sdml_ext.train "$@"
