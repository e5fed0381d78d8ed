#!/usr/bin/env bash
# The main job: set up (if needed), start the cluster, load real Debian package descriptions,
# watch them, show the worker draining, then search. Re-running is safe.
#   bash scripts/demo/demo.sh [--rows N|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
bash scripts/setup.sh
bash scripts/cluster.sh start
"$VENV/bin/python" scripts/demo/demo.py "$@"
