#!/usr/bin/env bash
# Install every model manifest in models/ (default: all-MiniLM-L6-v2) into the server's model dir.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# the setup's venv has pip even where the system python3 does not
PY=$VENV/bin/python
[ -x "$PY" ] || PY=python3
for m in models/*.json; do
  echo "==> model $(basename "$m" .json) -> $MODEL_ROOT"
  "$PY" models/install.py "$m" "$MODEL_ROOT"
done
