#!/usr/bin/env bash
# A local PostgreSQL cluster for development, tests, demos and benchmarks.
#   [PG_MAJOR=15|17|18] scripts/cluster.sh start|stop|restart|status|psql [args]|log
# Runs as the `postgres` OS user, port $PGPORT (default 5433 for 15, 54NN for NN), socket dir /tmp,
# with the extension preloaded so its launcher starts a drain worker in every database that has it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/env.sh"

# Data lives in the repo's ignored .pgdata when the postgres user can reach the repo, otherwise
# (e.g. a clone under /root, mode 700) under /var/lib/pg_embed_sidecar; one per major.
if [ -z "${PGDATA_DIR:-}" ]; then
  suffix=$([ "$PG_MAJOR" = 15 ] || echo "-$PG_MAJOR")
  if sudo -u postgres test -w "$REPO" 2>/dev/null || sudo -u postgres test -x "$REPO" 2>/dev/null; then
    PGDATA_DIR=$REPO/.pgdata$suffix
  else
    PGDATA_DIR=/var/lib/pg_embed_sidecar/data-$(echo "$REPO" | md5sum | cut -c1-8)$suffix
  fi
fi
LOGFILE=$PGDATA_DIR/server.log
as_pg() { sudo -u postgres "$@"; }

init() {
  [ -f "$PGDATA_DIR/PG_VERSION" ] && return
  echo "initdb $PGDATA_DIR"
  mkdir -p "$PGDATA_DIR" && chown postgres "$PGDATA_DIR" && chmod 700 "$PGDATA_DIR"
  as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >> "$PGDATA_DIR/postgresql.conf" <<CONF
# --- pg_embed_sidecar development cluster ---
listen_addresses = ''
unix_socket_directories = '/tmp'
shared_preload_libraries = 'pg_embed_sidecar'
max_worker_processes = 16
pg_embed_sidecar.intra_threads = 2
track_functions = 'all'
shared_buffers = 512MB
fsync = on
log_line_prefix = '%m [%p] %q%a '
CONF
}

start() {
  init
  if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    echo "cluster already running on port $PGPORT ($PGDATA_DIR)"; return
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$LOGFILE" -o "-p $PGPORT" -w start >/dev/null
  echo "cluster running on port $PGPORT, socket /tmp ($PGDATA_DIR)"
  for db in pes_test; do
    "$PG_BIN/psql" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 || "$PG_BIN/createdb" "$db"
  done
}

stop() {
  if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m "${STOP_MODE:-fast}" -w stop >/dev/null && echo "cluster stopped"
  else
    echo "cluster not running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status ;;
  psql) shift; exec "$PG_BIN/psql" "$@" ;;
  log) tail -n "${2:-50}" "$LOGFILE" ;;
  datadir) echo "$PGDATA_DIR" ;;
  *) echo "usage: $0 start|stop|restart|status|psql [args]|log [N]|datadir" >&2; exit 2 ;;
esac
