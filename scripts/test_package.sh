#!/usr/bin/env bash
# The package route, tested where nothing of ours is installed: a fresh Debian 12 root with
# Debian's postgresql-15 and nothing else (debootstrap, cached as a tarball after the first run,
# unpacked anew each time), into which `apt-get install ./*.deb` installs the packages of
# scripts/package.sh. Then CREATE EXTENSION, embed_text (dims and norm), watch + wait on 200 rows,
# search; then `dpkg -r` of the four packages must leave the root's files exactly as before.
#   bash scripts/test_package.sh [DEB_DIR]   (default target/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
DEBS=$(cd "${1:-target/debian}" && pwd)
BASE=/var/cache/pg_embed_sidecar/bookworm-postgresql-15-root.tar
ROOT=/var/tmp/pes-package-test
PORT=5499
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
PKGS=(postgresql-15-pg-embed-sidecar pg-embed-sidecar-models postgresql-15-pgvector postgresql-15-pgmq)

if [ ! -f "$BASE" ]; then
  echo "==> debootstrap bookworm + postgresql-15 (once; cached in $BASE)"
  command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
  rm -rf "$ROOT.base" && mkdir -p "$(dirname "$BASE")"
  debootstrap --variant=minbase --include=postgresql-15 bookworm "$ROOT.base" http://deb.debian.org/debian >/dev/null
  tar cf "$BASE.tmp" -C "$ROOT.base" . && mv "$BASE.tmp" "$BASE" && rm -rf "$ROOT.base"
fi

cleanup() {
  chroot "$ROOT" su postgres -c "pg_ctlcluster 15 main stop -m immediate" >/dev/null 2>&1 || true
  for m in dev/pts dev/shm dev proc; do umount "$ROOT/$m" 2>/dev/null || true; done
  rm -rf "$ROOT"
}
trap cleanup EXIT
cleanup
mkdir -p "$ROOT" && tar xf "$BASE" -C "$ROOT"
mount -t proc proc "$ROOT/proc" && mount --bind /dev "$ROOT/dev" && mount --bind /dev/shm "$ROOT/dev/shm" && mount --bind /dev/pts "$ROOT/dev/pts"
in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
sql() { in_root su postgres -c "psql -p $PORT -v ON_ERROR_STOP=1 -qAt -d pes -c \"$1\""; }
# the files of the root, less what dpkg and the cluster write for themselves
files() { (cd "$ROOT" && find . -xdev \( -path ./proc -o -path ./dev -o -path ./tmp -o -path ./var/lib/dpkg \
  -o -path ./var/log -o -path ./var/cache -o -path ./var/lib/apt -o -path ./var/lib/postgresql -o -path ./run -o -path ./var/run \) -prune -o -print | sort); }

echo "==> a clean PostgreSQL 15: $(in_root /usr/lib/postgresql/15/bin/postgres --version)"
[ ! -e "$ROOT/usr/lib/postgresql/15/lib/vector.so" ] || { echo "not clean: pgvector present" >&2; exit 1; }
# the test's own setup, before the snapshot: no service starts from package scripts; the cluster's
# port and the preload (what a user adds to postgresql.conf)
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d" && chmod +x "$ROOT/usr/sbin/policy-rc.d"
cat > "$ROOT/etc/postgresql/15/main/conf.d/pg_embed_sidecar.conf" <<CONF
port = $PORT
shared_preload_libraries = 'pg_embed_sidecar'
CONF
files > "$ROOT.before"
mkdir -p "$ROOT/tmp/debs"
cp "$DEBS"/pg-embed-sidecar-models_"$VERSION"_all.deb "$DEBS"/postgresql-15-*.deb "$ROOT/tmp/debs/"
echo "==> apt-get install ./*.deb: $(cd "$ROOT/tmp/debs" && ls | paste -sd' ')"
in_root sh -c 'apt-get install -y -q /tmp/debs/*.deb' >/dev/null 2>&1 || { in_root sh -c 'apt-get install -y /tmp/debs/*.deb'; exit 1; }

echo "==> preload, start, CREATE EXTENSION, embed_text, watch + wait, search"
in_root su postgres -c "pg_ctlcluster 15 main start"
in_root su postgres -c "createdb -p $PORT pes"
sql "CREATE EXTENSION pg_embed_sidecar CASCADE"
dims_norm=$(sql "SELECT vector_dims(v) || ' ' || round(sqrt(-(v <#> v))::numeric, 4) FROM (SELECT embed_text('a package install test') v) s")
[ "$dims_norm" = "384 1.0000" ] || { echo "embed_text: dims and norm '$dims_norm', expected '384 1.0000'" >&2; exit 1; }
sql "CREATE TABLE docs (id int PRIMARY KEY, body text);
     INSERT INTO docs SELECT g, 'package test document number ' || g FROM generate_series(1, 200) g;
     SELECT embed_sidecar.watch('docs', 'body')" >/dev/null
[ "$(sql "SELECT embed_sidecar.wait('docs', '180 s')")" = t ] || { echo "wait() timed out" >&2; exit 1; }
n=$(sql "SELECT count(*) FROM docs_embeddings")
[ "$n" = 200 ] || { echo "sidecar holds $n rows, expected 200" >&2; exit 1; }
top=$(sql "SELECT key->>0 FROM embed_sidecar.search('docs', 'package test document number 42', 1)")
[ "$top" = 42 ] || { echo "search's nearest is $top, expected 42" >&2; exit 1; }
echo "    embed_text: 384 dims, norm 1; 200 rows embedded by the worker; search finds row 42"
in_root su postgres -c "pg_ctlcluster 15 main stop"

echo "==> dpkg -r ${PKGS[*]}"
in_root dpkg -r "${PKGS[@]}" >/dev/null
left=$(in_root dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' "${PKGS[@]}" 2>/dev/null | grep -v '^un ' || true)
[ -z "$left" ] || { echo "dpkg still knows: $left" >&2; exit 1; }
files > "$ROOT.after"
if ! diff "$ROOT.before" "$ROOT.after" > "$ROOT.diff"; then
  echo "dpkg -r left the root changed:" >&2; cat "$ROOT.diff" >&2; exit 1
fi
rm -f "$ROOT.before" "$ROOT.after" "$ROOT.diff"
echo "==> package route OK: installed into a clean PostgreSQL 15, worked, removed without a trace"
