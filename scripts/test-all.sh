#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, golden corpus, property tests
# and the end-to-end tests with real processes (registry, cache server,
# executor). Needs root (mounts, namespaces) and installs its prerequisites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh

# The storage servers of the replica tests (s3s-fs, Garage, Azurite), built
# or installed once per machine under /opt/kiln-tools (scripts/install-tools.sh;
# about 25 minutes of CPU the first time, nothing afterwards).
scripts/install-tools.sh
root="${KILN_TOOLS_ROOT:-/opt/kiln-tools}"
S3S_FS="${KILN_S3S_FS:-$root/bin/s3s-fs}"
GARAGE="${KILN_GARAGE:-$root/bin/garage}"
AZURITE="${KILN_AZURITE:-$root/azurite/bin/azurite-blob}"
export KILN_S3S_FS="$S3S_FS" KILN_GARAGE="$GARAGE" KILN_AZURITE="$AZURITE" KILN_REQUIRE_S3=1
# One optimised profile for everything, so RocksDB's C++ is compiled once.
# The end-to-end tests run the real binaries: build them first.
cargo build --release --workspace --locked --bins
# kiln's own images, built by kiln and checked with skopeo and buildah; the
# GitLab Kaniko job test (tests/tests/e2e/gitlab_kaniko_job.rs) runs in them.
deploy/build-images.sh --oci-layout out/images --check
export KILN_EXECUTOR_IMAGES="$PWD/out/images" KILN_REQUIRE_IMAGES=1
exec cargo test --release --workspace --locked "$@"
