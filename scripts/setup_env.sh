#!/usr/bin/env bash
# Creates .venv (once), installs requirements.txt into it and builds the extension in place.
# Sourced by the other scripts; safe to run again (the build is incremental).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AMAPO_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "amapo_kernels: creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q -r "$ROOT/requirements.txt" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') else 1)" \
  || { echo "amapo_kernels: torch==2.14.1 did not install"; exit 1; }
echo "amapo_kernels: building the extension (AMAPO_CUDA=${AMAPO_CUDA:-auto})"
"$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$PY" -c "import amapo_kernels" || { echo "amapo_kernels: the build failed (see above)"; exit 1; }
