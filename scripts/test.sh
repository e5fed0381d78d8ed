#!/usr/bin/env bash
# The project's test command (README, .ci/run): every tier, strictest last.
#   0. gates, in seconds: rustfmt, clippy (warnings are errors; unsafe code documented), upgrade
#      scripts generated from their hand-written change (scripts/upgrade_sql.py)
#   1. inference core, plain cargo test (no Postgres)
#   2. SQL functions inside a backend (#[pg_test], each rolled back) and the drain's decisions
#      (src/drain/settle.rs, plain #[test]): cargo pgrx test
#   3. pg_regress golden files (SQL API) and pg_isolation_regress specs (concurrency promises)
#   4. integration suite against a running cluster with the worker preloaded (pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh  # idempotent: seconds when everything is installed

echo "== 0/4 gates: cargo fmt --check, cargo clippy -D warnings, upgrade scripts current"
# (rustfmt and clippy come with the toolchain; a toolchain without them cannot get them offline)
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all --check; else echo "!! rustfmt missing: format not checked"; fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --release -- -D warnings
else
  echo "!! clippy missing: lints not checked"
fi
python3 scripts/upgrade_sql.py --check

echo "== 1/4 inference core: cargo test -p embed_core"
cargo test -p embed_core --release

echo "== 2/4 SQL functions in a backend, drain decisions: cargo pgrx test"
mkdir -p /var/lib/pg_embed_sidecar && chown postgres /var/lib/pg_embed_sidecar
cargo pgrx test pg15 --release --runas postgres --pgdata /var/lib/pg_embed_sidecar/pgrx-test

# the tiers below need the fault-injection hook (pg_embed_sidecar.test_fail_marker), which release
# installs (scripts/setup.sh) leave out
cargo pgrx install --release --features fault_injection --pg-config "$PG_CONFIG" >/dev/null
bash scripts/cluster.sh restart

echo "== 3/4 pg_regress and isolation specs"
bash scripts/regress.sh

echo "== 4/4 integration suite: worker, triggers, queue, authority, crash and restart (pytest)"
"$VENV/bin/python" -m pytest tests -v -p no:cacheprovider "$@"
