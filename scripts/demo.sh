#!/usr/bin/env bash
# Sets up .venv, builds the extension and runs the demo on the built-in batch (CPU, offline).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m amapo_kernels.demo "$@"
