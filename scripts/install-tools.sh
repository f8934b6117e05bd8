#!/usr/bin/env bash
# Installs the storage servers the replica tests run against, once per
# machine, outside the clone (default /opt/kiln-tools): s3s-fs and Garage
# from crates.io, Azurite from npm. Idempotent: a tool whose binary is there
# is skipped. scripts/test-all.sh calls it; .ci/run starts it in the
# background at the beginning, so that the two cargo installs use the cores
# the workspace build leaves idle (docs/performance.md, "Cold CI").
#
# Where (each overridable; test-all.sh passes the same variables on to the
# tests): KILN_S3S_FS, KILN_GARAGE, KILN_AZURITE (the binaries; installing
# puts them under KILN_TOOLS_ROOT, default /opt/kiln-tools).
set -euo pipefail
# Not .ci/run's clippy wrapper: these are other projects' crates.
unset RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS

root="${KILN_TOOLS_ROOT:-/opt/kiln-tools}"
S3S_FS="${KILN_S3S_FS:-$root/bin/s3s-fs}"
GARAGE="${KILN_GARAGE:-$root/bin/garage}"
AZURITE="${KILN_AZURITE:-$root/azurite/bin/azurite-blob}"

# Installs into a scratch root, then copies the binary to where it is
# expected (which may be outside $root when KILN_S3S_FS/KILN_GARAGE say so).
# Both cargo installs share one target directory, so the crates they have in
# common (same version and features: tokio, hyper, rustls, ...) are compiled
# once. Built at opt-level 1 and without debug information: they are test
# peers, and code generation at opt-level 3 was most of a cold CI run's
# largest single item (Garage: ~49 minutes of wall clock beside the
# workspace build; docs/performance.md, "Cold CI"). KILN_TOOLS_OPT_LEVEL
# overrides it.
tools_target=""
cleanup() { [[ -z "$tools_target" ]] || rm -rf "$tools_target"; }
trap cleanup EXIT
cargo_install() { # BINARY-PATH NAME ARGS...
  local dest=$1 name=$2; shift 2
  [[ -n "$tools_target" ]] || tools_target=$(mktemp -d "${TMPDIR:-/tmp}/kiln-tools-target.XXXXXX")
  local scratch
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/kiln-tools-root.XXXXXX")
  echo "install-tools: building $name (cargo install $*)" >&2
  local started=$SECONDS
  CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_OPT_LEVEL="${KILN_TOOLS_OPT_LEVEL:-1}" \
    cargo install --locked --target-dir "$tools_target" \
    --root "$scratch" "$@"
  install -D -m 0755 "$scratch/bin/$name" "$dest"
  rm -rf "$scratch"
  echo "install-tools: $name built in $((SECONDS - started)) s -> $dest" >&2
}

# A real S3-compatible server for the object-storage replica tests (0.14.1:
# the newest release that builds with our Rust toolchain).
[[ -x "$S3S_FS" ]] || cargo_install "$S3S_FS" s3s-fs s3s-fs --version 0.14.1 --features binary
# Garage, a distributed S3-compatible store (three nodes on loopback in the
# replica tests).
[[ -x "$GARAGE" ]] || cargo_install "$GARAGE" garage garage --version 2.5.0 \
  --no-default-features --features lmdb,bundled-libs
# Azurite, Microsoft's Azure Storage emulator, for the az:// replica tests
# (cache-server/tests/server/azure.rs), from npm (~15 s; needs node).
if [[ ! -x "$AZURITE" ]]; then
  prefix="$root/azurite"
  if [[ -n "${KILN_AZURITE:-}" ]]; then
    # .../bin/azurite-blob -> the npm prefix two levels up
    prefix=$(dirname "$(dirname "$KILN_AZURITE")")
  fi
  npm install -g --no-audit --no-fund --prefix "$prefix" azurite@3.37.0
  [[ -x "$AZURITE" ]] || { echo "install-tools: npm did not create $AZURITE" >&2; exit 1; }
fi
