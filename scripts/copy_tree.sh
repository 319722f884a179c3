#!/usr/bin/env bash
# Copies this tree into DEST as a clone of it would be, plus the new files git does not ignore: the install
# checks build and test the working tree in a folder where nothing was built before.
# Usage: bash scripts/copy_tree.sh DEST
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:?usage: bash scripts/copy_tree.sh DEST}"
mkdir -p "$DEST"
# Tracked and new files that exist (a tracked file deleted in the working tree is left out).
(cd "$ROOT" && git ls-files -co --exclude-standard -z \
  | while IFS= read -r -d '' file; do if [ -e "$file" ]; then printf '%s\0' "$file"; fi; done \
  | tar --null -T - -cf -) | tar -xf - -C "$DEST"
