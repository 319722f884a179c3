#!/usr/bin/env bash
# CI step: the GPU machine's torch and Triton on this CPU machine, so that an incompatibility with them shows
# here and not in the few device-minutes a session may be lent. The GPU image has torch 2.11.0+cu130 and
# Triton 3.6.0 on Python 3.12; a venv here gets the same torch and Triton on this machine's Python, and the
# README's test command in existing-torch mode runs the whole suite against them with AMAPO_CUDA=1: the
# extension built by nvcc 13.0 against that torch (as gpu_check.sh part1 builds it), its SASS checks, the
# CUDA kernels through the CPU emulation, the Triton kernels under Triton 3.6's interpreter and compiled for
# sm_90a by its compiler, the driver under DeepSpeed. Not covered: Python 3.12, anything that needs the GPU.
# numpy < 2.4 because Triton 3.6's interpreter cannot run loops with a newer one (triton-lang/triton#9171):
# the GPU image's numpy 2.5 only skips the interpreter tests there, here they must run.
# Usage: bash scripts/check_gpu_image_stack.sh   (about 18 minutes on 2 cores, a 4.8 GB venv under /tmp)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_PIN=2.11.0 EXPECTED="torch 2.11.0+cu130, triton 3.6.0"
WORK="$(mktemp -d /tmp/amapo_gpu_image_stack.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
TREE="$WORK/tree" VENV="$WORK/venv" LOG="$WORK/test.log"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo "== check_gpu_image_stack: $*"; }
fail() { echo "check_gpu_image_stack: FAILED: $*"; exit 1; }
stack() { "$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")'; }

step "a fresh copy of the tree in $TREE"
bash "$ROOT/scripts/copy_tree.sh" "$TREE"

step "a venv with torch==$TORCH_PIN (PyPI's CUDA 13.0 build, with its Triton) and numpy<2.4"
python3 -m venv "$VENV"
"$PY" -m pip install -q "torch==$TORCH_PIN" "numpy<2.4" 2>&1 | { grep -v "^WARNING: Location" || true; }
[ "$(stack)" = "$EXPECTED" ] || fail "the venv has $(stack), the GPU image $EXPECTED"

step "the README's test command in existing-torch mode, AMAPO_CUDA=1, every test"
status=0
AMAPO_USE_EXISTING_TORCH=1 AMAPO_VENV="$VENV" AMAPO_CUDA=1 AMAPO_HYPOTHESIS_EXAMPLES=5 \
  bash "$TREE/scripts/test.sh" -p no:cacheprovider -rfEs tests >"$LOG" 2>&1 || status=$?
grep -v "^SKIPPED" "$LOG" || true  # -rs lists each skip's reason in the log, for the check below
[ "$status" -eq 0 ] || fail "the test command exited with $status (see above)"
[ "$(stack)" = "$EXPECTED" ] || fail "the test command replaced the venv's torch or Triton: $(stack)"
! grep -q "some requirements could not be installed" "$LOG" || fail "the requirements did not install beside torch"
! grep -q "triton-lang/triton#9171" "$LOG" || fail "the Triton interpreter tests were skipped (numpy >= 2.4?)"
step "passed: $(tail -1 "$LOG") under $EXPECTED"
