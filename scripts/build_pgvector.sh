#!/usr/bin/env bash
# Builds pgvector for PostgreSQL $1 from the upstream tarball of a Debian source package, pinned by
# the sha256 its .dsc names, and installs it (into $2 as DESTDIR when given: scripts/package.sh).
#   15: trixie's 0.8.0 (what 0.2.0 was measured with); 17, 18: sid's 0.8.6 (0.8.0 does not build
#   against 18, and sid's index already names a newer version whose files this mirror lacks)
set -euo pipefail
MAJOR=$1 DESTDIR=${2:-}
PG_CONFIG=/usr/lib/postgresql/$MAJOR/bin/pg_config
case "$MAJOR" in
  15) TARBALL=pgvector_0.8.0.orig.tar.gz SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0 ;;
  *) TARBALL=pgvector_0.8.6.orig.tar.gz SHA256=25c9b78cfdaa43c66788d7490246ac24e4fe1c86f19c4b60c089b723f84a4a0d ;;
esac
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
curl -fsSL -o "$build/src.tar.gz" "http://deb.debian.org/debian/pool/main/p/pgvector/$TARBALL"
echo "$SHA256  $build/src.tar.gz" | sha256sum -c --quiet
mkdir "$build/src" && tar xzf "$build/src.tar.gz" -C "$build/src" --strip-components=1
# OPTFLAGS="": no -march=native, so that a package built here runs on any x86-64 (as Debian's own)
make -s -C "$build/src" PG_CONFIG="$PG_CONFIG" OPTFLAGS="" -j"$(nproc)" >/dev/null
make -s -C "$build/src" PG_CONFIG="$PG_CONFIG" ${DESTDIR:+DESTDIR="$DESTDIR"} install >/dev/null
sed -n "s/default_version = '\(.*\)'/\1/p" "$build/src/vector.control"
