#!/usr/bin/env bash
# The project's test command (README, .ci/run): every tier, strictest last, on every PostgreSQL
# major we support (15, 17, 18; TEST_MAJORS="15 17" to choose). Extra arguments go to pytest.
#   0. gates, in seconds: rustfmt, clippy (warnings are errors; unsafe code documented), upgrade
#      scripts generated from their hand-written change (scripts/upgrade_sql.py)
#   1. inference core, plain cargo test (no Postgres)
#   then for each major, after PG_MAJOR=V scripts/setup.sh (builds 17/18 the first time):
#   2. SQL functions inside a backend (#[pg_test], each rolled back) and the drain's decisions
#      (src/drain/settle.rs, plain #[test]): cargo pgrx test pgV
#   3. pg_regress golden files (SQL API) and pg_isolation_regress specs (concurrency promises)
#   4. integration suite against a running cluster with the worker preloaded (pytest): the whole
#      suite on one major, the smoke subset below on the others. Which major gets the whole suite
#      rotates with the commit (its commit count modulo the number of majors), so that every major
#      gets it every third commit; FULL_MAJOR=V picks it.
#   then the package route: the .deb of every major built (scripts/package.sh), and those of 15
#   installed into a fresh Debian 12 root with Debian's PostgreSQL 15 (scripts/test_package.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
MAJORS=(${TEST_MAJORS:-15 17 18})
# the promises every major must keep in every run: CREATE EXTENSION, embed_text's parity with the
# independent reference, models, a watched table kept in step through inserts, updates, deletes
# and restarts, the launcher's workers, search
SMOKE=(tests/service/test_embed.py tests/models/test_models.py tests/lifecycle/test_sidecar.py
       tests/workers/test_launcher.py tests/search/test_search.py)
if [ -z "${FULL_MAJOR:-}" ]; then
  n=$(git rev-list --count HEAD 2>/dev/null || echo 0)
  FULL_MAJOR=${MAJORS[$((n % ${#MAJORS[@]}))]}
fi
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

mkdir -p /var/lib/pg_embed_sidecar && chown postgres /var/lib/pg_embed_sidecar
for major in "${MAJORS[@]}"; do
  (
    export PG_MAJOR=$major PGPORT= PG_CONFIG=
    source scripts/env.sh
    echo "== PostgreSQL $PG_MAJOR (port $PGPORT): setup"
    # (the extension itself is built below, with the test features)
    SKIP_EXTENSION_INSTALL=1 bash scripts/setup.sh
    if [ "$PG_MAJOR" != 15 ] && cargo clippy --version >/dev/null 2>&1; then
      # the code behind src/pg/compat.rs's other branches, lint-clean too
      cargo clippy --release --no-default-features --features "pg$PG_MAJOR" -- -D warnings
    fi

    echo "== 2/4 [pg$PG_MAJOR] SQL functions in a backend, drain decisions: cargo pgrx test"
    pgdata=/var/lib/pg_embed_sidecar/pgrx-test$([ "$PG_MAJOR" = 15 ] || echo "-$PG_MAJOR")
    cargo pgrx test "pg$PG_MAJOR" --release --runas postgres --pgdata "$pgdata"

    # the tiers below need the fault-injection hook (pg_embed_sidecar.test_fail_marker), which
    # release installs (scripts/setup.sh) leave out
    cargo pgrx install --release --features fault_injection --pg-config "$PG_CONFIG" >/dev/null
    bash scripts/cluster.sh restart

    echo "== 3/4 [pg$PG_MAJOR] pg_regress and isolation specs"
    bash scripts/regress.sh

    if [ "$PG_MAJOR" = "$FULL_MAJOR" ]; then
      echo "== 4/4 [pg$PG_MAJOR] integration suite, whole: worker, triggers, queue, authority, crash and restart (pytest)"
      "$VENV/bin/python" -m pytest tests -v -p no:cacheprovider "$@"
    else
      echo "== 4/4 [pg$PG_MAJOR] integration suite, smoke subset (the whole suite ran on pg$FULL_MAJOR)"
      "$VENV/bin/python" -m pytest "${SMOKE[@]}" -v -p no:cacheprovider "$@"
    fi
  )
done

echo "== package route: scripts/package.sh for every major built, installed into a clean PostgreSQL 15"
bash scripts/package.sh
bash scripts/test_package.sh
echo "== all tiers passed on PostgreSQL ${MAJORS[*]} (whole integration suite on $FULL_MAJOR)"
