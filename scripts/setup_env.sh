#!/usr/bin/env bash
# Sets up the Python environment, installs requirements.txt into it and builds the extension in place.
# Sourced by the other scripts; safe to run again (the build is incremental). Sets PY and VENV.
#
# Default: creates .venv (once) and installs the pinned torch of requirements.txt into it.
# AMAPO_USE_EXISTING_TORCH=1: keeps the torch that the environment already has (a cluster image, a CUDA
#   torch preinstalled, no network): torch is neither installed nor replaced, the other requirements are
#   installed beside it where missing (a warning, not an error, when they cannot be fetched), and the
#   extension is compiled against that torch.
# AMAPO_PYTHON=/path/to/python: use this interpreter as it is, no venv (e.g. the system python3 of a GPU
#   machine whose torch is preinstalled); AMAPO_VENV=dir: another venv than .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The pinned requirements (transformers 5.23.0, trl 1.16.0) need Python 3.11: one line naming it, exit 2, not
# pip's "no matching distribution" after a venv was made of the old interpreter.
require_python_311() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' && return
  echo "amapo_kernels: $1 is Python $("$1" -c 'import platform; print(platform.python_version())'); the pinned" \
    "requirements need Python >= 3.11$2" >&2
  exit 2
}

if [ -n "${AMAPO_PYTHON:-}" ]; then
  PY="$AMAPO_PYTHON"
  VENV="$("$PY" -c 'import sys; print(sys.prefix)' 2>/dev/null)" || VENV=""
  if [ -z "$VENV" ]; then
    echo "amapo_kernels: AMAPO_PYTHON=$PY is not a Python interpreter that runs here" >&2
    exit 2
  fi
  require_python_311 "$PY" ""
else
  VENV="${AMAPO_VENV:-$ROOT/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    require_python_311 python3 " (AMAPO_PYTHON=/path/to/python3.11 runs another as it is)"
    echo "amapo_kernels: creating $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  require_python_311 "$PY" " (remove $VENV to make it anew)"
fi

quiet_pip() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

case "${AMAPO_USE_EXISTING_TORCH:-0}" in
  1 | on | true | yes)
    TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" || {
      echo "amapo_kernels: AMAPO_USE_EXISTING_TORCH=1 but $PY cannot import torch (install torch first)"
      exit 1
    }
    echo "amapo_kernels: using the existing torch $TORCH_VERSION of $PY"
    # Everything but the torch pin, with torch held at the installed version so nothing upgrades it. The pin
    # is the installed distribution's version, which pip matches: torch.__version__ can differ from it (PyPI's
    # torch 2.11.0 says 2.11.0+cu130), and a pin on that made the whole install unresolvable.
    REQS="$(mktemp)" PIN="$(mktemp)" LOG="$(mktemp)"
    grep -v '^torch[=<>~! ]' "$ROOT/requirements.txt" >"$REQS"
    echo "torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')" >"$PIN"
    if ! "$PY" -m pip install -q --retries 1 --timeout 15 -r "$REQS" -c "$PIN" >"$LOG" 2>&1; then
      grep -v "^WARNING: Location" "$LOG" | tail -5
      echo "amapo_kernels: WARNING: some requirements could not be installed (offline?); the tests that need them will fail to import"
    fi
    rm -f "$REQS" "$PIN" "$LOG"
    ;;
  0 | off | false | no)
    quiet_pip -r "$ROOT/requirements.txt"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') else 1)" \
      || { echo "amapo_kernels: torch==2.14.1 did not install (AMAPO_USE_EXISTING_TORCH=1 keeps yours)"; exit 1; }
    ;;
  *)
    echo "amapo_kernels: AMAPO_USE_EXISTING_TORCH must be 1 or 0, got '$AMAPO_USE_EXISTING_TORCH'"
    exit 2
    ;;
esac
echo "amapo_kernels: building the extension (AMAPO_CUDA=${AMAPO_CUDA:-auto})"
quiet_pip --no-build-isolation --no-deps -e "$ROOT"
# From ROOT: another directory holding an amapo_kernels folder (a second checkout) would shadow this one.
(cd "$ROOT" && "$PY" -c "import amapo_kernels") || { echo "amapo_kernels: the build failed (see above)"; exit 1; }
