#!/usr/bin/env bash
# Installs everything pg_embed_sidecar needs on a fresh Debian 12 machine, as root, from package
# registries only. Idempotent: every step checks for its result first and says what it does.
#   [PG_MAJOR=15|17|18] bash scripts/setup.sh
# 15 (the default) is Debian 12's server; 17 and 18 are built from Debian's source packages
# (scripts/build_postgres.sh, about 3 minutes each on two cores, once).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# Every apt-get update asks for English descriptions too: this image sets Acquire::Languages
# "none", and a plain update would delete the Translation-en lists the demo corpus comes from.
apt_update() { apt-get update -q -o Acquire::Languages=en; }
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
skip() { printf '    %s (already there)\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# --- Debian packages ---------------------------------------------------------------------------
APT_PKGS=(postgresql-15 postgresql-server-dev-15 sudo libclang-dev clang pkg-config build-essential
          dpkg-dev python3-venv ca-certificates curl unzip debootstrap)
# what building PostgreSQL from source takes (18's tarball no longer carries the generated parser)
[ "$PG_MAJOR" = 15 ] || APT_PKGS+=(bison flex libreadline-dev zlib1g-dev libicu-dev libssl-dev)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  apt_update
  apt-get install -y -q "${missing[@]}"
else
  skip "Debian packages"
fi
# Debian starts a 'main' cluster on 5432; we run our own cluster and need none of it.
if pg_lsclusters -h 2>/dev/null | grep -q '^15 \+main .* online'; then pg_ctlcluster 15 main stop || true; fi

# --- PostgreSQL itself, when not Debian 12's ----------------------------------------------------
if [ "$PG_MAJOR" != 15 ]; then
  [ -x "$PG_CONFIG" ] || step "PostgreSQL $PG_MAJOR from Debian's source package"
  bash scripts/build_postgres.sh "$PG_MAJOR"
  source scripts/env.sh  # its paths, now that its pg_config exists
fi

# --- cargo-pgrx --------------------------------------------------------------------------------
if cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  skip "cargo-pgrx $PGRX_VERSION"
else
  step "cargo install cargo-pgrx $PGRX_VERSION (a few minutes)"
  cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked
fi
# pgrx's config names exactly the majors present: every build checks every pg_config it names (one
# removed since fails all builds), and init only adds to it, so it starts from an empty one
init_args=() want=""
for v in 15 17 18; do
  cfg=/usr/lib/postgresql/$v/bin/pg_config
  [ -x "$cfg" ] || continue
  init_args+=(--pg$v "$cfg")
  want+="pg$v = \"$cfg\""$'\n'
done
have=$(grep -s '^pg[0-9]* *=' "${PGRX_HOME:-$HOME/.pgrx}/config.toml" | sed 's/ *= */ = /' | sort)
if [ "$have" = "$(printf '%s' "$want" | sort)" ]; then
  skip "cargo pgrx init"
else
  step "cargo pgrx init ${init_args[*]}"
  rm -f "${PGRX_HOME:-$HOME/.pgrx}/config.toml"
  cargo pgrx init "${init_args[@]}"
fi

# --- pgvector from Debian's source package (scripts/build_pgvector.sh) --------------------------
if [ -f "$PG_SHAREDIR/extension/vector.control" ]; then
  skip "pgvector $(sed -n "s/default_version = '\(.*\)'/\1/p" "$PG_SHAREDIR/extension/vector.control")"
else
  step "pgvector from Debian's source package, for PostgreSQL $PG_MAJOR"
  bash scripts/build_pgvector.sh "$PG_MAJOR" >/dev/null
fi

# --- pgmq (pure SQL) from the crates.io crate --------------------------------------------------
if [ -f "$PG_SHAREDIR/extension/pgmq--$PGMQ_VERSION.sql" ]; then
  skip "pgmq $PGMQ_VERSION"
else
  step "pgmq $PGMQ_VERSION: SQL files of crate pgmq $PGMQ_CRATE_VERSION"
  tmp=$(mktemp -d)
  curl -fsSL -o "$tmp/pgmq.crate" "https://static.crates.io/crates/pgmq/pgmq-$PGMQ_CRATE_VERSION.crate"
  echo "$PGMQ_CRATE_SHA256  $tmp/pgmq.crate" | sha256sum -c --quiet
  tar xzf "$tmp/pgmq.crate" -C "$tmp"
  emb="$tmp/pgmq-$PGMQ_CRATE_VERSION/src/install/embedded"
  grep -q "default_version = '$PGMQ_VERSION'" "$emb/pgmq.control"
  # pure SQL: no shared library, so the control file must not name one
  grep -v '^module_pathname' "$emb/pgmq.control" > "$PG_SHAREDIR/extension/pgmq.control"
  cp "$emb/sql/pgmq.sql" "$PG_SHAREDIR/extension/pgmq--$PGMQ_VERSION.sql"
  rm -rf "$tmp"
fi

# --- Python venv: ONNX Runtime wheel (its shared library) and the reference implementation -----
if "$VENV/bin/python" -c "import onnxruntime, onnx, tokenizers, numpy, psycopg, pytest; assert onnxruntime.__version__ == '$ORT_VERSION'" 2>/dev/null; then
  skip "venv $VENV"
else
  step "python venv $VENV (onnxruntime==$ORT_VERSION, onnx (test models), tokenizers, numpy, psycopg, pytest)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "onnxruntime==$ORT_VERSION" "onnx==1.19.*" "tokenizers==0.22.*" "numpy<3" "psycopg[binary]==3.*" "pytest==8.*"
fi
ort_src=$("$VENV/bin/python" -c "import onnxruntime,os; print(os.path.join(os.path.dirname(onnxruntime.__file__),'capi','libonnxruntime.so.$ORT_VERSION'))")
if cmp -s "$ort_src" "$ORT_LIB"; then
  skip "ONNX Runtime library $ORT_LIB"
else
  step "ONNX Runtime library -> $ORT_LIB"
  install -D -m 0755 "$ort_src" "$ORT_LIB"
fi

# --- default model -----------------------------------------------------------------------------
bash models/install.sh

# --- the demo corpus --------------------------------------------------------------------------
# Debian's long package descriptions (Translation-en) and the package lists, copied where no later
# apt-get update (ours or anyone's) can delete them. Last of the apt steps, so it sees their lists.
if ls "$CORPUS_DIR"/*Translation-en* "$CORPUS_DIR"/*_Packages* >/dev/null 2>&1; then
  skip "demo corpus $CORPUS_DIR"
else
  if ! ls /var/lib/apt/lists/*bookworm_main_i18n_Translation-en* >/dev/null 2>&1; then
    step "apt-get update -o Acquire::Languages=en (demo corpus)"
    apt_update
  fi
  step "demo corpus -> $CORPUS_DIR"
  mkdir -p "$CORPUS_DIR"
  cp /var/lib/apt/lists/*bookworm_main_i18n_Translation-en* /var/lib/apt/lists/*_main_binary-*_Packages* "$CORPUS_DIR"/
  chmod -R a+rX "$CORPUS_DIR"
fi

# --- the extension itself ----------------------------------------------------------------------
if [ "${SKIP_EXTENSION_INSTALL:-0}" = 1 ]; then
  skip "extension build (SKIP_EXTENSION_INSTALL=1)"
else
  step "cargo pgrx install --release (builds only what changed)"
  cargo pgrx install --release --pg-config "$PG_CONFIG" 2>&1 | grep -v '^\s*$' | tail -n 3
fi
step "setup complete"
