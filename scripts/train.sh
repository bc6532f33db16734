#!/usr/bin/env bash
# The README's first command: sets up .venv (scripts/setup.sh), then trains SDML on the embedded
# UCI digits with the parallel strategy and prints the mAP table. Arguments go to
# `python -m sdml_ext.train` (see --help), e.g. `bash scripts/train.sh --epochs 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Sleeping instead of spinning OpenMP threads: on a machine shared with other work a spinning
# thread steals the core its partner needs, and a 2-thread training step was measured 4-10x
# slower on a loaded 2-core machine. Set OMP_WAIT_POLICY yourself to override.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m sdml_ext.train "$@"
