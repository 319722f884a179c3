#!/usr/bin/env bash
# Sets up .venv, builds the extension and runs amapo-train: with no arguments the tiny default
# (random tiny Llama, bundled HH-RLHF pairs, CPU, offline). Arguments go to amapo-train.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$VENV/bin/amapo-train" "$@"
