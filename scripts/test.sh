#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -P: do not put the repo root on sys.path, so the installed package (with _C) is imported.
exec .venv/bin/python -P -m pytest tests "$@"
