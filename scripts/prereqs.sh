#!/usr/bin/env bash
# Installs the Debian packages kiln's build and tests need, if missing.
# Idempotent; safe to call from every entry point (README commands, CI).
set -euo pipefail

packages=(
  libclang-dev clang        # RocksDB's bindgen
  docker-registry           # Distribution 2.8, the reference registry (tests)
  skopeo umoci buildah      # real peers the end-to-end tests compare against
  busybox-static            # base images are made offline from it
  apache2-utils             # htpasswd for the Basic-auth registry test
  openssl jq time zstd attr
  erofs-utils               # fsck.erofs checks the layer images kiln writes (tests)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's docker-registry package runs a registry service on :5000 where
# systemd runs. It is left alone, yours or not: the tests start their own
# registries on free loopback ports (20000-31999) and need no port free.

# promtool, for the metrics test (unpacked, not installed: see the script).
scripts_dir=$(dirname "$0")
"$scripts_dir/install-promtool.sh" >/dev/null

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
