# Shared settings for the scripts. Sourced, never run.
# PG_MAJOR picks the PostgreSQL major (15: Debian 12's packages, the default; 17, 18: built from
# Debian's source packages by scripts/build_postgres.sh into Debian's layout for that major).
PG_MAJOR=${PG_MAJOR:-15}
PGRX_VERSION=0.18.1
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PG_BIN=$("$PG_CONFIG" --bindir 2>/dev/null || echo "/usr/lib/postgresql/$PG_MAJOR/bin")
PG_SHAREDIR=$("$PG_CONFIG" --sharedir 2>/dev/null || echo "/usr/share/postgresql/$PG_MAJOR")
PG_PKGLIBDIR=$("$PG_CONFIG" --pkglibdir 2>/dev/null || echo "/usr/lib/postgresql/$PG_MAJOR/lib")
PGMQ_VERSION=1.11.1
PGMQ_CRATE_VERSION=0.33.7
PGMQ_CRATE_SHA256=50eb534c14338bf3c0048606af7ea9fbf32f674debe392f9267eeeddf0582d1d
ORT_VERSION=1.32.0
# Everything the server loads lives outside /root (mode 700): the postgres user must read it.
VENV=/opt/pg_embed_sidecar/venv
ORT_LIB=$PG_PKGLIBDIR/pg_embed_sidecar/libonnxruntime.so
# Debian package lists the demo loads (scripts/demo/load_debian.py), copied there by setup.sh
CORPUS_DIR=/opt/pg_embed_sidecar/corpus
MODEL_ROOT=$PG_SHAREDIR/extension/pg_embed_sidecar/models
# each major its own port, so that clusters of several majors can run side by side
case "$PG_MAJOR" in 15) default_port=5433 ;; *) default_port=$((5400 + PG_MAJOR)) ;; esac
export PG_MAJOR PGHOST=${PGHOST:-/tmp} PGPORT=${PGPORT:-$default_port} PGUSER=${PGUSER:-postgres}
export PGDATABASE=${PGDATABASE:-postgres}
