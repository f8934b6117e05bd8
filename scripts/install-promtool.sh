#!/usr/bin/env bash
# Puts promtool (Prometheus' linter) at /opt/kiln-tools/bin/promtool unless
# one is on PATH already, and prints its path. It comes from Debian's
# `prometheus` package, unpacked rather than installed: installing the
# package would also start a Prometheus server on :9090, a service nobody
# asked for. Used by scripts/prereqs.sh (the metrics test in
# cache-server/tests/server/telemetry.rs) and scripts/validate-deploy.sh (the
# alert and recording rules of deploy/kubernetes).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
dest=${KILN_TOOLS:-/opt/kiln-tools}/bin/promtool
if [[ ! -x "$dest" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "installing promtool (from Debian's prometheus package) to $dest" >&2
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  install -D -m 0755 "$tmp/root/usr/bin/promtool" "$dest"
fi
echo "$dest"
