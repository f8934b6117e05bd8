#!/usr/bin/env bash
# Builds examples/hello offline: no registry, no cache server (the embedded
# cache in --cache-dir is the default). The base filesystem is the host's
# busybox-static, copied into the build context. Writes an OCI layout to
# ${1:-out/hello} and prints the image's manifest digest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh

ctx=examples/hello
out="${1:-out/hello}"
mkdir -p "$ctx/rootfs/bin"
install -m 0755 /bin/busybox "$ctx/rootfs/bin/busybox"

cargo build --release --locked -p kiln-executor
bin="${CARGO_TARGET_DIR:-target}/release/kiln-executor"

"$bin" --context "$ctx" --dockerfile "$ctx/Dockerfile" \
  --oci-layout-path "$out" --destination kiln.local/hello:latest --no-push \
  --digest-file "$out.digest"
echo "image $(cat "$out.digest") written to $out (inspect: skopeo inspect oci:$out:latest)"
