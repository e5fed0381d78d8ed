#!/usr/bin/env bash
# The pg_regress and pg_isolation_regress tiers, with PostgreSQL's own drivers, against the running
# cluster (scripts/cluster.sh start). Each driver gets a fresh database (pes_regress, pes_isolation)
# created here, with pg_embed_sidecar.drain_worker = off so that no background worker drains there
# and every run is deterministic (the drain runs only when a test calls process()).
#   tests/pg_regress/{sql,expected}   the SQL API's behaviour (errors, watch/unwatch, status)
#   tests/isolation/{specs,expected}  the concurrency promises, interleavings pinned
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PGXS_TEST=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test
out=${REGRESS_OUT:-/tmp/pg_embed_sidecar-regress}
rm -rf "$out" && mkdir -p "$out/regress" "$out/isolation"
common=(--host="$PGHOST" --port="$PGPORT" --user=postgres --bindir="$PG_BIN" --use-existing)
# what pg_regress does when it creates a database itself, plus the worker switch
for db in pes_regress pes_isolation; do
  "$PG_BIN/psql" -q -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
DROP DATABASE IF EXISTS $db;
CREATE DATABASE $db TEMPLATE template0;
ALTER DATABASE $db SET lc_messages TO 'C';
ALTER DATABASE $db SET lc_monetary TO 'C';
ALTER DATABASE $db SET lc_numeric TO 'C';
ALTER DATABASE $db SET lc_time TO 'C';
ALTER DATABASE $db SET bytea_output TO 'hex';
ALTER DATABASE $db SET timezone_abbreviations TO 'Default';
ALTER DATABASE $db SET pg_embed_sidecar.drain_worker TO off;
\c $db
CREATE EXTENSION pg_embed_sidecar CASCADE;
SQL
done
status=0
"$PGXS_TEST/regress/pg_regress" "${common[@]}" --dbname=pes_regress --inputdir=tests/pg_regress \
  --outputdir="$out/regress" $(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$//') || status=1
"$PGXS_TEST/isolation/pg_isolation_regress" "${common[@]}" --dbname=pes_isolation --inputdir=tests/isolation \
  --outputdir="$out/isolation" $(cd tests/isolation/specs && ls *.spec | sed 's/\.spec$//') || status=1
if [ $status -ne 0 ]; then
  find "$out" -name regression.diffs -exec cat {} +
fi
exit $status
