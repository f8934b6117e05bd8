#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, golden corpus, property tests
# and the end-to-end tests with real processes (registry, cache server,
# executor). Needs root (mounts, namespaces) and installs its prerequisites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh

# A real S3-compatible server for the object-storage replica tests, built
# once from crates.io and kept outside the clone (0.14.1: the newest release
# that builds with our Rust toolchain).
S3S_FS="${KILN_S3S_FS:-/opt/kiln-tools/bin/s3s-fs}"
if [[ ! -x "$S3S_FS" ]]; then
  cargo install --locked s3s-fs --version 0.14.1 --features binary --root /opt/kiln-tools
fi
# Garage, a distributed S3-compatible store (three nodes on loopback in the
# replica tests), built the same way (~8 minutes the first time).
GARAGE="${KILN_GARAGE:-/opt/kiln-tools/bin/garage}"
if [[ ! -x "$GARAGE" ]]; then
  cargo install --locked garage --version 2.5.0 --no-default-features \
    --features lmdb,bundled-libs --root /opt/kiln-tools
fi
# Azurite, Microsoft's Azure Storage emulator, for the az:// replica tests
# (cache-server/tests/azure.rs), from npm (~15 s; needs node).
AZURITE="${KILN_AZURITE:-/opt/kiln-tools/azurite/bin/azurite-blob}"
if [[ ! -x "$AZURITE" ]]; then
  npm install -g --no-audit --no-fund --prefix /opt/kiln-tools/azurite azurite@3.37.0
fi
export KILN_S3S_FS="$S3S_FS" KILN_GARAGE="$GARAGE" KILN_AZURITE="$AZURITE" KILN_REQUIRE_S3=1
# One optimised profile for everything, so RocksDB's C++ is compiled once.
# The end-to-end tests run the real binaries: build them first.
cargo build --release --workspace --locked --bins
# kiln's own images, built by kiln and checked with skopeo and buildah; the
# GitLab Kaniko job test (tests/tests/gitlab_kaniko_job.rs) runs in them.
deploy/build-images.sh --oci-layout out/images --check
export KILN_EXECUTOR_IMAGES="$PWD/out/images" KILN_REQUIRE_IMAGES=1
exec cargo test --release --workspace --locked "$@"
