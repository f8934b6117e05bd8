#!/bin/sh
# Pull + unpack benchmark of kiln's registry client and unpacker.
#
# Builds a large base image (busybox + copies of /usr/share, /usr/include and
# /usr/lib/python3*: ~880 MB, ~60k files, one gzip layer made by umoci),
# pushes it to a local Distribution registry (Debian's docker-registry), then
# runs the pull_unpack example under /usr/bin/time -v twice: with an empty
# local store (download + unpack) and with a warm store (unpack only).
#
# usage: benches/e2e/pull-unpack.sh [WORKDIR]   (needs root for umoci unpack,
# the docker-registry, skopeo, umoci, busybox-static and time packages)
set -eu
WORK=${1:-$(mktemp -d /tmp/kiln-bench-pull.XXXXXX)}
TARGET=${CARGO_TARGET_DIR:-target}
PORT=${PORT:-5599}
cd "$(dirname "$0")/../.."
if [ -z "${BIN:-}" ]; then
  cargo build --release -p kiln-e2e --example pull_unpack
  BIN="$TARGET/release/examples/pull_unpack"
fi

if [ ! -f "$WORK/layout/index.json" ]; then
  umoci init --layout "$WORK/layout"
  umoci new --image "$WORK/layout:big"
  umoci unpack --image "$WORK/layout:big" "$WORK/bundle" >/dev/null
  R="$WORK/bundle/rootfs"
  mkdir -p "$R/bin" "$R/usr/lib" "$R/tmp"
  cp /bin/busybox "$R/bin/busybox"
  for a in sh ls cat echo true; do ln -sf busybox "$R/bin/$a"; done
  cp -a /usr/share "$R/usr/share"
  cp -a /usr/include "$R/usr/include"
  cp -a /usr/lib/python3* "$R/usr/lib/" 2>/dev/null || true
  echo "rootfs: $(du -sh "$R" | cut -f1), $(find "$R" | wc -l) entries"
  umoci repack --image "$WORK/layout:big" "$WORK/bundle"
  umoci config --image "$WORK/layout:big" --os linux --architecture amd64
  rm -rf "$WORK/bundle"
fi

cat > "$WORK/registry.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: 127.0.0.1:$PORT
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG=$!
trap 'kill $REG 2>/dev/null || true' EXIT
sleep 1
skopeo copy --dest-tls-verify=false "oci:$WORK/layout:big" "docker://127.0.0.1:$PORT/big:latest" >/dev/null

# Each run unpacks into a new directory, and the trees are deleted only
# after both runs: deleting 60k files (ext4 with discard) keeps the file
# system busy for many seconds and would slow the next measured run down.
rm -rf "$WORK/rootfs-cold" "$WORK/rootfs-warm" "$WORK/store"
sync
sleep 10
for run in cold warm; do
  echo "== $run store"
  /usr/bin/time -v "$BIN" "127.0.0.1:$PORT/big:latest" "$WORK/rootfs-$run" "$WORK/store" "127.0.0.1:$PORT" 2>"$WORK/time-$run.txt"
  grep -E "Elapsed|Maximum resident|User time|System time" "$WORK/time-$run.txt"
  sync
done
rm -rf "$WORK/rootfs-cold" "$WORK/rootfs-warm"
