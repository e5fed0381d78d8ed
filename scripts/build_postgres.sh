#!/usr/bin/env bash
# Builds PostgreSQL $1 (17 or 18) from the upstream tarball of Debian's source package, into
# Debian's own layout for that major: binaries and libraries under /usr/lib/postgresql/$1, shared
# files under /usr/share/postgresql/$1. Run by setup.sh when PG_MAJOR is set; skipped when the
# server is already there. Debian 12 ships no binary package of either (17 is trixie's, 18 sid's),
# so this prefix is free on this system, and an extension package built against it installs into
# the paths Debian's own postgresql-$1 uses.
#
# Only the upstream tarball is used, not Debian's patches or its debian/rules build: that build
# runs the whole regression suite and builds documentation and several variants, about an hour on
# two cores; this is core, contrib (auto_explain and postgres_fdw are used by our tests; Debian's
# server package holds all of contrib too) and the isolation tester.
set -euo pipefail
MAJOR=$1
PREFIX=/usr/lib/postgresql/$MAJOR
[ -x "$PREFIX/bin/pg_config" ] && { echo "    PostgreSQL $MAJOR in $PREFIX (already there)"; exit 0; }
# Pinned: the upstream tarball of a Debian source package, by its sha256 from that package's .dsc.
# (trixie-security's index names 17.12, whose pool files this mirror does not serve; it serves
# the two below.)
case "$MAJOR" in
  17) TARBALL=postgresql-17/postgresql-17_17.11.orig.tar.bz2  # 17.11-0+deb13u1 (trixie)
      SHA256=dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979 ;;
  18) TARBALL=postgresql-18/postgresql-18_18.6.orig.tar.bz2   # 18.6-3 (sid)
      SHA256=555610c24d53e4316da5b7d3fc25c279d96856d5e0e23ee308c328c5fa881d9f ;;
  *) echo "build_postgres.sh: PostgreSQL $MAJOR is not built from source here (15 comes from Debian's packages; 16 is in no Debian suite)" >&2; exit 2 ;;
esac
build=$(mktemp -d /var/tmp/pg$MAJOR-build.XXXX)
trap 'rm -rf "$build"' EXIT
curl -fsSL -o "$build/src.tar.bz2" "http://deb.debian.org/debian/pool/main/p/$TARBALL"
echo "$SHA256  $build/src.tar.bz2" | sha256sum -c --quiet
tar xjf "$build/src.tar.bz2" -C "$build"
src=$(echo "$build"/postgresql-"$MAJOR".*/)
cd "$src"
echo "    configure (prefix $PREFIX)"
./configure -q --prefix="$PREFIX" --datadir="/usr/share/postgresql/$MAJOR" \
  --with-icu --with-openssl --with-readline --without-llvm >/dev/null
echo "    make -j$(nproc) (about three minutes on two cores)"
make -s -j"$(nproc)" >/dev/null 2>"$build/make.err" || { tail -n 30 "$build/make.err"; exit 1; }
make -s install >/dev/null
# contrib, and what the test tiers use: pg_isolation_regress + isolationtester
for dir in contrib src/test/isolation; do
  make -s -C "$dir" -j"$(nproc)" >/dev/null 2>>"$build/make.err"
  make -s -C "$dir" install >/dev/null
done
"$PREFIX/bin/pg_config" --version
