#!/usr/bin/env bash
# Cache-server throughput on local disk vs. object storage (s3s-fs on
# 127.0.0.1), through one and two replicas sharing the bucket. Results go to
# docs/performance.md ("Object storage and replicas").
#
#   export CARGO_TARGET_DIR=/var/cache/kiln/target
#   cargo build --release -p kiln-cache-server -p kiln-benches --bin kiln-cache-server --bin cache-load
#   benches/s3/run.sh [DURATION_SECS] [CONCURRENCY] [BLOB_MB]
#
# Needs s3s-fs (cargo install --locked s3s-fs --version 0.14.1 --features binary
# --root /opt/kiln-tools). Everything listens on 127.0.0.1 and is stopped
# on exit.
set -euo pipefail
duration=${1:-5}
concurrency=${2:-16}
blob_mb=${3:-100}
target=${CARGO_TARGET_DIR:-target}/release
server_bin=${KILN_CACHE_SERVER_BIN:-$target/kiln-cache-server}
s3s=${KILN_S3S_FS:-/opt/kiln-tools/bin/s3s-fs}
[[ -x "$s3s" ]] || { echo "s3s-fs not found at $s3s" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-s3-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() { # FILE
  for _ in $(seq 1 300); do [[ -s "$1" ]] && { cat "$1"; return; }; sleep 0.1; done
  echo "no port in $1" >&2; exit 1
}

start_server() { # NAME EXTRA_ARGS... (in this shell, so cleanup knows the pid)
  local name=$1; shift
  RUST_LOG=warn "$server_bin" --listen 127.0.0.1:0 --gc-interval 0 \
    --data "$work/$name" --port-file "$work/$name.port" "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
}
url_of() { echo "http://127.0.0.1:$(wait_port "$work/$1.port")"; }

load() { # URL LABEL
  echo "== $2"
  "$target/cache-load" --server "$1" --duration "$duration" --concurrency "$concurrency" \
    --blob-mb "$blob_mb" --blob-rounds 2 --entries 2000
}

echo "## load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
start_server local
local_url=$(url_of local)
load "$local_url" "local disk, one server"

mkdir -p "$work/s3/kiln"
NO_COLOR=1 RUST_LOG=info "$s3s" --host 127.0.0.1 --port 0 --access-key bench --secret-key bench-secret \
  "$work/s3" >"$work/s3s.log" 2>&1 </dev/null &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'http://127.0.0.1:' "$work/s3s.log" && break; sleep 0.1; done
endpoint=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/s3s.log" | head -1)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
s3_args=(--storage s3://kiln/bench --s3-endpoint "$endpoint" --s3-region us-east-1)
start_server r1 "${s3_args[@]}"
start_server r2 "${s3_args[@]}"
r1=$(url_of r1)
r2=$(url_of r2)
load "$r1" "object storage, one replica"
echo "== object storage, two replicas at once (sum the two)"
load "$r1" "  replica 1" >"$work/r1.out" 2>&1 &
l1=$!
load "$r2" "  replica 2" >"$work/r2.out" 2>&1 &
l2=$!
wait "$l1" "$l2"
cat "$work/r1.out" "$work/r2.out"
echo "## load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
