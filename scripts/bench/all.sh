#!/usr/bin/env bash
# Benchmarks (not part of the tests): prints markdown tables. Uses the demo's data.
#   bash scripts/bench/all.sh [--short N] [--long N] [--threads N] ...
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
bash scripts/setup.sh >/dev/null
cargo build --release -q -p embed_core --bin embed_ceiling
bash scripts/cluster.sh start >/dev/null
psql -qAtc "SELECT 1 FROM pg_tables WHERE tablename = 'packages_embeddings'" | grep -q 1 \
  || "$VENV/bin/python" scripts/demo/demo.py --rows all >/dev/null
"$VENV/bin/python" scripts/bench/throughput.py "$@"
