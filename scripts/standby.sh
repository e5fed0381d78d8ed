#!/usr/bin/env bash
# A streaming-replication standby of the development cluster (scripts/cluster.sh), for the replica
# and failover tests: pg_basebackup -R from the running primary, started on port $STANDBY_PORT
# (default 5434; 64NN for major NN; socket /tmp). Its postgresql.conf is the primary's, so the extension is preloaded
# there too; its worker starts only once it is promoted.
#   scripts/standby.sh start|stop|promote|destroy|log
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/env.sh"
STANDBY_PORT=${STANDBY_PORT:-$([ "$PG_MAJOR" = 15 ] && echo 5434 || echo $((6400 + PG_MAJOR)))}
DIR=/var/lib/pg_embed_sidecar/standby-$(echo "$REPO" | md5sum | cut -c1-8)-$PG_MAJOR
as_pg() { sudo -u postgres "$@"; }

stop() {
  if [ -f "$DIR/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$DIR" -m fast -w stop >/dev/null && echo "standby stopped"
  fi
}

case "${1:-}" in
  start)
    if [ ! -f "$DIR/PG_VERSION" ]; then
      mkdir -p /var/lib/pg_embed_sidecar && chown postgres /var/lib/pg_embed_sidecar
      as_pg "$PG_BIN/pg_basebackup" -h "$PGHOST" -p "$PGPORT" -U postgres -D "$DIR" -R -X stream -c fast
      echo "base backup of port $PGPORT in $DIR"
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -o "-p $STANDBY_PORT" -w start >/dev/null
    echo "standby running on port $STANDBY_PORT ($DIR)" ;;
  promote) as_pg "$PG_BIN/pg_ctl" -D "$DIR" -w promote >/dev/null && echo "standby promoted" ;;
  stop) stop ;;
  destroy) stop; rm -rf "$DIR"; echo "standby removed" ;;
  log) tail -n "${2:-50}" "$DIR/server.log" ;;
  *) echo "usage: $0 start|stop|promote|destroy|log [N]" >&2; exit 2 ;;
esac
