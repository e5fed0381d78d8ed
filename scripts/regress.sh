#!/usr/bin/env bash
# The pg_regress and pg_isolation_regress tiers, with PostgreSQL's own drivers, against the running
# cluster (scripts/cluster.sh start). Each driver creates its own database (pes_regress,
# pes_isolation) where no background worker runs, so every run is deterministic.
#   tests/pg_regress/{sql,expected}   the SQL API's behaviour (errors, watch/unwatch, status)
#   tests/isolation/{specs,expected}  the concurrency promises, interleavings pinned
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PGXS_TEST=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test
out=${REGRESS_OUT:-/tmp/pg_embed_sidecar-regress}
rm -rf "$out" && mkdir -p "$out/regress" "$out/isolation"
common=(--host="$PGHOST" --port="$PGPORT" --user=postgres --bindir="$PG_BIN"
        --load-extension=vector --load-extension=pgmq --load-extension=pg_embed_sidecar)
status=0
"$PGXS_TEST/regress/pg_regress" "${common[@]}" --dbname=pes_regress --inputdir=tests/pg_regress \
  --outputdir="$out/regress" $(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$//') || status=1
"$PGXS_TEST/isolation/pg_isolation_regress" "${common[@]}" --dbname=pes_isolation --inputdir=tests/isolation \
  --outputdir="$out/isolation" $(cd tests/isolation/specs && ls *.spec | sed 's/\.spec$//') || status=1
if [ $status -ne 0 ]; then
  find "$out" -name regression.diffs -exec cat {} +
fi
exit $status
