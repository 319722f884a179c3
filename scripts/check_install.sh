#!/usr/bin/env bash
# CI step: the ways of installing that the README promises, on a copy of this tree in a venv that already
# has a torch other than the pinned one (the CPU-only torch 2.13.0, as on a user's machine or cluster image):
#   1. `pip install .` (pip's isolated build) stops at once with the message to use --no-build-isolation;
#   2. `pip install --no-build-isolation .` works, records the torch it compiled against, and importing
#      from the source tree names the shadowing instead of failing obscurely;
#   3. the README's test command in existing-torch mode (AMAPO_USE_EXISTING_TORCH=1) keeps that torch,
#      builds against it and runs: every test module imports, and the kernel tests pass.
# Usage: bash scripts/check_install.sh [torch version, default 2.13.0]   (about 3 minutes on 2 cores)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_PIN="${1:-2.13.0}"
WORK="$(mktemp -d /tmp/amapo_install_check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
TREE="$WORK/tree" VENV="$WORK/venv"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset AMAPO_CUDA  # auto: a CPU-only torch must give a CPU-only build, not a failed CUDA one
step() { echo "== check_install: $*"; }
fail() { echo "check_install: FAILED: $*"; exit 1; }

step "a fresh copy of the tree (what git would clone, plus new files) in $TREE"
bash "$ROOT/scripts/copy_tree.sh" "$TREE"

step "a venv with torch==$TORCH_PIN and the build tools, nothing else"
python3 -m venv "$VENV"
"$PY" -m pip install -q "torch==$TORCH_PIN" numpy setuptools wheel "cmake>=3.26" ninja
torch_version() { "$PY" -c 'import torch; print(torch.__version__)'; }
INSTALLED_TORCH="$(torch_version)"

step "1. pip install . (isolated build) must stop at once and say --no-build-isolation"
START=$SECONDS
if "$PY" -m pip install "$TREE" >"$WORK/isolated.log" 2>&1; then fail "an isolated build succeeded"; fi
grep -q -- "--no-build-isolation" "$WORK/isolated.log" || { cat "$WORK/isolated.log"; fail "no clear message"; }
echo "stopped after $((SECONDS - START)) s with: $(grep -m1 'amapo-kernels: torch' "$WORK/isolated.log")"

step "2. pip install --no-build-isolation . (non-editable)"
"$PY" -m pip install -q --no-build-isolation --no-deps "$TREE"
BUILT_WITH="$(cd "$WORK" && "$PY" -c 'import amapo_kernels._C as C; print(C.torch_version)')"
[ "$BUILT_WITH" = "$INSTALLED_TORCH" ] || fail "the build recorded torch $BUILT_WITH, the venv has $INSTALLED_TORCH"
(cd "$WORK" && "$PY" -c 'import amapo_kernels, torch; print(amapo_kernels.sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)))')
if (cd "$TREE" && "$PY" -c 'import amapo_kernels' >"$WORK/shadow.log" 2>&1); then fail "the source tree imported without a build"; fi
grep -q "shadows the installed package" "$WORK/shadow.log" || { cat "$WORK/shadow.log"; fail "no shadowing message"; }
echo "import from the source tree says: $(grep -m1 -o 'amapo_kernels: the source tree.*shadows[^(]*' "$WORK/shadow.log")"
"$PY" -m pip uninstall -q -y amapo-kernels

step "3. the README's test command with AMAPO_USE_EXISTING_TORCH=1"
AMAPO_USE_EXISTING_TORCH=1 AMAPO_VENV="$VENV" AMAPO_HYPOTHESIS_EXAMPLES=5 bash "$TREE/scripts/test.sh" \
  -p no:cacheprovider -x tests/test_sequence_logps.py tests/test_nan_propagation.py tests/test_install.py
[ "$(torch_version)" = "$INSTALLED_TORCH" ] || fail "torch was replaced: $(torch_version)"
(cd "$TREE" && PYTHONPATH="$TREE/python" "$PY" -m pytest -q -p no:cacheprovider --collect-only tests >"$WORK/collect.log" 2>&1) \
  || { tail -30 "$WORK/collect.log"; fail "some test modules do not import"; }
echo "$(tail -1 "$WORK/collect.log") (every test module imports under torch $INSTALLED_TORCH)"
step "passed: torch $INSTALLED_TORCH kept, extension built against it"
