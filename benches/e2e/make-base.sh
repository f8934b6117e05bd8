#!/usr/bin/env bash
# Builds a base image offline (no Docker Hub) and pushes it to a registry.
#
# usage: benches/e2e/make-base.sh big|small WORKDIR REGISTRY [REPO]
#
#   small  Debian's static /bin/busybox plus a symlink for every applet it
#          lists, /etc/passwd, /etc/group, /tmp (about 2 MB, ~400 files)
#   big    the same plus a copy of /usr/share and generated files up to
#          BIG_FILES entries in the rootfs (default 64000; ~800 MB with
#          Debian's /usr/share of ~650 MB / ~50k files)
#
# The rootfs is packed as a one-layer OCI image with umoci (init, new,
# unpack, repack, config) in WORKDIR/layout, tag "latest", then pushed with
#   skopeo copy --dest-tls-verify=false oci:WORKDIR/layout:latest docker://REGISTRY/REPO:latest
# REPO defaults to "base" (big) or "base-small" (small).
# If WORKDIR/layout already holds the image it is reused (set
# KILN_E2E_REBUILD_BASE=1 to force a rebuild); only the push is redone.
#
# Needs root (umoci unpack keeps owners), umoci, skopeo, busybox-static.
set -euo pipefail

usage() {
  echo "usage: $0 big|small WORKDIR REGISTRY [REPO]" >&2
  exit 2
}

[ "$#" -ge 3 ] || usage
KIND=$1
WORK=$2
REGISTRY=$3
case "$KIND" in
  big) REPO=${4:-base} ;;
  small) REPO=${4:-base-small} ;;
  *) usage ;;
esac
BIG_FILES=${BIG_FILES:-64000}
BUSYBOX=${BUSYBOX:-/bin/busybox}

for tool in umoci skopeo; do
  command -v "$tool" >/dev/null || { echo "$0: $tool not found" >&2; exit 1; }
done
[ -x "$BUSYBOX" ] || { echo "$0: $BUSYBOX not found (apt-get install busybox-static)" >&2; exit 1; }

mkdir -p "$WORK"
LAYOUT="$WORK/layout"

build_rootfs() {
  local r=$1
  mkdir -p "$r/bin" "$r/sbin" "$r/usr/bin" "$r/usr/sbin" "$r/etc" "$r/root" \
    "$r/tmp" "$r/var/tmp" "$r/proc" "$r/sys" "$r/dev"
  chmod 1777 "$r/tmp" "$r/var/tmp"
  chmod 700 "$r/root"
  cp "$BUSYBOX" "$r/bin/busybox"
  local applet
  while read -r applet; do
    [ -n "$applet" ] && [ "$applet" != busybox ] && ln -sf busybox "$r/bin/$applet"
  done < <("$BUSYBOX" --list)
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
  printf 'hosts: files dns\n' >"$r/etc/nsswitch.conf"

  if [ "$KIND" = big ]; then
    mkdir -p "$r/usr"
    cp -a /usr/share "$r/usr/share"
    # Top up with small generated files (256 per directory) to BIG_FILES.
    local have missing d=0 i
    have=$(find "$r" | wc -l)
    missing=$((BIG_FILES - have))
    if [ "$missing" -gt 0 ]; then
      mkdir -p "$r/usr/lib/bench-filler"
      i=0
      while [ "$i" -lt "$missing" ]; do
        if [ $((i % 256)) -eq 0 ]; then
          d=$((i / 256))
          mkdir -p "$r/usr/lib/bench-filler/d$d"
          i=$((i + 1))
          continue
        fi
        printf 'filler file %d of the kiln e2e base image\n' "$i" >"$r/usr/lib/bench-filler/d$d/f$i.txt"
        i=$((i + 1))
      done
    fi
  fi
}

# The layout is built under a temporary name and renamed when complete, so an
# interrupted run never leaves a half-made image to be reused.
if [ -n "${KILN_E2E_REBUILD_BASE:-}" ] || [ ! -f "$LAYOUT/index.json" ]; then
  NEW="$WORK/layout.new"
  rm -rf "$LAYOUT" "$NEW" "$WORK/bundle"
  umoci init --layout "$NEW"
  umoci new --image "$NEW:latest"
  umoci unpack --image "$NEW:latest" "$WORK/bundle" >/dev/null
  build_rootfs "$WORK/bundle/rootfs"
  echo "make-base: $KIND rootfs: $(du -sh "$WORK/bundle/rootfs" | cut -f1), $(find "$WORK/bundle/rootfs" | wc -l) entries" >&2
  umoci repack --image "$NEW:latest" "$WORK/bundle"
  umoci config --image "$NEW:latest" --os linux --architecture amd64 \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.cmd /bin/sh \
    --author kiln-e2e
  umoci gc --layout "$NEW"
  rm -rf "$WORK/bundle"
  mv "$NEW" "$LAYOUT"
fi

skopeo copy --quiet --dest-tls-verify=false "oci:$LAYOUT:latest" "docker://$REGISTRY/$REPO:latest"
echo "make-base: pushed $REGISTRY/$REPO:latest" >&2
