#!/usr/bin/env bash
# Sets up .venv, builds the extension and runs the test suite. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m cuda` on a GPU machine runs the CUDA tests only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m pytest -q "$@"
