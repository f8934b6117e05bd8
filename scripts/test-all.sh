#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, golden corpus, property tests
# and the end-to-end tests with real processes (registry, cache server,
# executor). Needs root (mounts, namespaces) and installs its prerequisites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh
# One optimised profile for everything, so RocksDB's C++ is compiled once.
# The end-to-end tests run the real binaries: build them first.
cargo build --release --workspace --locked --bins
exec cargo test --release --workspace --locked "$@"
