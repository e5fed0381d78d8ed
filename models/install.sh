#!/usr/bin/env bash
# Install every model manifest in models/ (default: all-MiniLM-L6-v2) into the server's model dir.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
for m in models/*.json; do
  echo "==> model $(basename "$m" .json) -> $MODEL_ROOT"
  python3 models/install.py "$m" "$MODEL_ROOT"
done
