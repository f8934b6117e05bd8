#!/usr/bin/env bash
# Builds examples/hello offline: no registry, no cache server (the embedded
# cache is the default). The base filesystem is the host's busybox-static.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh

ctx=examples/hello
mkdir -p "$ctx/rootfs/bin"
install -m 0755 /bin/busybox "$ctx/rootfs/bin/busybox"

cargo build --release --locked -p kiln-executor
bin="${CARGO_TARGET_DIR:-target}/release/kiln-executor"

"$bin" --dry-run --context "$ctx" --dockerfile "$ctx/Dockerfile"
