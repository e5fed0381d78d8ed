# Shared settings for the scripts. Sourced, never run.
PGRX_VERSION=0.18.1
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BIN=$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
PG_SHAREDIR=$("$PG_CONFIG" --sharedir 2>/dev/null || echo /usr/share/postgresql/15)
PG_PKGLIBDIR=$("$PG_CONFIG" --pkglibdir 2>/dev/null || echo /usr/lib/postgresql/15/lib)
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
export PGHOST=${PGHOST:-/tmp} PGPORT=${PGPORT:-5433} PGUSER=${PGUSER:-postgres}
export PGDATABASE=${PGDATABASE:-postgres}
