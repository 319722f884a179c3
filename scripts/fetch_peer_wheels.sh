#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels that scripts/gpu_check.sh installs on a GPU machine
# with no network: the benchmark peers (Liger-Kernel, Cut Cross-Entropy, TRL) and what that machine's image
# lacks for the tests and TRL's loss path (datasets and its pure-Python dependencies, expecttest), and for
# amapo-train under ZeRO-3 (gpu_check.sh part3): DeepSpeed (PyPI has only its source: built here into a
# pure-Python wheel, its ops compiled just in time there if ever used), its hjson and pydantic, and the
# project's transformers pin (the image has 5.17). torch, triton, accelerate and numpy are already there
# and are never carried (--no-deps).
# Target: CPython 3.12, manylinux x86-64 (the GPU image's python3). Into /.whl/ (git-ignored).
# Usage: bash scripts/fetch_peer_wheels.sh [dir]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0)
# TRL imports datasets; these are its dependencies that the image does not hold.
SUPPORT=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 expecttest==0.3.0)
# amapo-train's: the project's pins and DeepSpeed's dependencies the image does not hold.
TRAINING=(transformers==5.23.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
          typing-inspection==0.4.5)
DEEPSPEED=deepspeed==0.19.8
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PEERS[@]}" "${SUPPORT[@]}" "${TRAINING[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
# DS_BUILD_OPS=0: no op is compiled into the wheel, so it is py3-none-any.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED" 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
# Keep one version per project: pip refuses to install two.
"$PY" - "$DEST" <<'EOF'
import collections, pathlib, re, sys
wheels = collections.defaultdict(list)
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    wheels[re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()].append(wheel.name)
clash = {name: files for name, files in wheels.items() if len(files) > 1}
if clash:
    sys.exit(f"fetch_peer_wheels: several versions of {clash}: remove the old ones from {sys.argv[1]}")
EOF
ls -l "$DEST"
echo "fetch_peer_wheels: $(find "$DEST" -maxdepth 1 -name "*.whl" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST (carry it: run(carry=['.whl']))"
