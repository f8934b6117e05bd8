#!/usr/bin/env bash
# Cache-server throughput on local disk vs. object storage on 127.0.0.1, through
# one and two replicas sharing the bucket. Results go to docs/performance.md
# ("Object storage and replicas").
#
#   export CARGO_TARGET_DIR=/var/cache/kiln/target
#   cargo build --release -p kiln-cache-server -p kiln-benches --bin kiln-cache-server --bin cache-load
#   benches/s3/run.sh [--store s3s-fs|garage|all] [DURATION_SECS] [CONCURRENCY] [BLOB_MB]
#
# Stores (default all; the local-disk run always comes first):
#   s3s-fs  one s3s-fs process (cargo install --locked s3s-fs --version 0.14.1
#           --features binary --root /opt/kiln-tools); $KILN_S3S_FS overrides.
#   garage  a three-node Garage cluster, replication factor 3 (cargo install
#           --locked garage --version 2.5.0 --no-default-features --features
#           lmdb,bundled-libs --root /opt/kiln-tools); $KILN_GARAGE overrides.
#           Replica 1 talks to node 0's S3 endpoint, replica 2 to node 1's.
#
# Everything listens on 127.0.0.1 and is stopped on exit. The work dir (data,
# logs) is removed on exit unless KILN_BENCH_KEEP=1; when the script fails it
# prints the tail of every log first.
set -euo pipefail

usage() {
  sed -n '8p' "$0" | sed 's/^#   /usage: /' >&2
  exit 2
}
store=all
positional=()
while (($#)); do
  case $1 in
    --store) (($# >= 2)) || usage; store=$2; shift 2 ;;
    --store=*) store=${1#--store=}; shift ;;
    -h | --help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) positional+=("$1"); shift ;;
  esac
done
case $store in s3s-fs | garage | all) ;; *) echo "unknown store $store" >&2; usage ;; esac
duration=${positional[0]:-5}
concurrency=${positional[1]:-16}
blob_mb=${positional[2]:-100}

target=${CARGO_TARGET_DIR:-target}/release
server_bin=${KILN_CACHE_SERVER_BIN:-$target/kiln-cache-server}
s3s=${KILN_S3S_FS:-/opt/kiln-tools/bin/s3s-fs}
garage=${KILN_GARAGE:-/opt/kiln-tools/bin/garage}
want() { [[ $store == all || $store == "$1" ]]; }
for bin in "$server_bin" "$target/cache-load"; do
  [[ -x "$bin" ]] || { echo "$bin not found (build it, see the top of $0)" >&2; exit 1; }
done
if want s3s-fs; then [[ -x "$s3s" ]] || { echo "s3s-fs not found at $s3s" >&2; exit 1; }; fi
if want garage; then [[ -x "$garage" ]] || { echo "garage not found at $garage" >&2; exit 1; }; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-s3-bench.XXXXXX")
pids=()
cleanup() {
  local status=$?
  if ((status != 0)); then
    for f in "$work"/*.log "$work"/garage/node*/garage.log; do
      [[ -s "$f" ]] || continue
      echo "---- last lines of $f ----" >&2
      tail -n 20 "$f" >&2
    done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${KILN_BENCH_KEEP:-} == 1 ]]; then echo "## kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

wait_port() { # FILE
  for _ in $(seq 1 300); do [[ -s "$1" ]] && { cat "$1"; return; }; sleep 0.1; done
  echo "no port in $1" >&2; exit 1
}

start_server() { # NAME EXTRA_ARGS... (in this shell, so cleanup knows the pid)
  local name=$1; shift
  NO_COLOR=1 RUST_LOG=warn "$server_bin" --listen 127.0.0.1:0 --gc-interval 0 \
    --data "$work/$name" --port-file "$work/$name.port" "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
}
url_of() { echo "http://127.0.0.1:$(wait_port "$work/$1.port")"; }

load() { # URL LABEL
  echo "== $2"
  "$target/cache-load" --server "$1" --duration "$duration" --concurrency "$concurrency" \
    --blob-mb "$blob_mb" --blob-rounds 2 --entries 2000
}

# One replica alone, then two replicas on the same bucket loaded at the same
# time by two generators (each runs the whole load: same keys, same blobs).
# The two-replica run uses a fresh prefix, so its entries and blobs are really
# written to the store again (cache-load's blobs are the same bytes every run;
# under the first prefix they would only be hashed and found). The single
# replica and replica 1 talk to ENDPOINT1, replica 2 to ENDPOINT2 (the same
# endpoint for a single-process store). Credentials come from
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
replica_runs() { # NAME LABEL BUCKET REGION ENDPOINT1 ENDPOINT2
  local name=$1 label=$2 bucket=$3 region=$4 e1=$5 e2=$6
  local s3=(--s3-region "$region")
  start_server "$name-1" --storage "s3://$bucket/bench-1" --s3-endpoint "$e1" "${s3[@]}"
  start_server "$name-r1" --storage "s3://$bucket/bench-2" --s3-endpoint "$e1" "${s3[@]}"
  start_server "$name-r2" --storage "s3://$bucket/bench-2" --s3-endpoint "$e2" "${s3[@]}"
  local single r1 r2 l1 l2
  single=$(url_of "$name-1")
  r1=$(url_of "$name-r1")
  r2=$(url_of "$name-r2")
  load "$single" "$label, one replica ($e1)"
  echo "== $label, two replicas at once (sum the two)"
  load "$r1" "  replica 1 ($e1)" >"$work/$name-r1.out" 2>&1 &
  l1=$!
  load "$r2" "  replica 2 ($e2)" >"$work/$name-r2.out" 2>&1 &
  l2=$!
  local rc=0
  wait "$l1" || rc=$?
  wait "$l2" || rc=$?
  cat "$work/$name-r1.out" "$work/$name-r2.out"
  ((rc == 0)) || { echo "a generator failed (exit $rc)" >&2; exit 1; }
  log_summary "$work/$name-1.log" "$work/$name-r1.log" "$work/$name-r2.log"
}

log_summary() { # LOG... — WARN/ERROR lines, counted by message (no timestamps)
  local f
  for f in "$@"; do
    echo "## ${f#"$work"/}: $(grep -cE ' (WARN|ERROR) ' "$f" || true) WARN/ERROR lines"
    grep -E ' (WARN|ERROR) ' "$f" | sed 's/^[^ ]* *//' | cut -c1-600 | sort | uniq -c | sort -rn | head -5 || true
  done
}

echo "## load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
start_server local
local_url=$(url_of local)
load "$local_url" "local disk, one server"

if want s3s-fs; then
  mkdir -p "$work/s3/kiln"
  NO_COLOR=1 RUST_LOG=info "$s3s" --host 127.0.0.1 --port 0 --access-key bench --secret-key bench-secret \
    "$work/s3" >"$work/s3s.log" 2>&1 </dev/null &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q 'http://127.0.0.1:' "$work/s3s.log" && break; sleep 0.1; done
  endpoint=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/s3s.log" | head -1)
  [[ -n $endpoint ]] || { echo "s3s-fs did not start" >&2; exit 1; }
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
  replica_runs s3s "s3s-fs" kiln us-east-1 "$endpoint" "$endpoint"
fi

# ---- Garage: three nodes, replication factor 3 (as tests/src/garage.rs) ----
garage_key=GK$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')  # GK + 24 hex digits
garage_secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n') # 64 hex digits
garage_bucket=kiln-cache
garage_region=garage
used_ports=" "
free_port() { # sets $port: nothing on 127.0.0.1 answers on it, not handed out before
  for _ in $(seq 1 1000); do
    port=$((20000 + RANDOM % 40000))
    [[ $used_ports == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      used_ports+="$port "
      return
    fi
  done
  echo "no free port found" >&2; exit 1
}
garage_cli() { # NODE ARGS... — retried for 30 s while the cluster settles
  local node=$1; shift
  local out
  for _ in $(seq 1 150); do
    if out=$("$garage" -c "$work/garage/node$node/garage.toml" "$@" 2>&1); then
      printf '%s\n' "$out"
      return
    fi
    sleep 0.2
  done
  echo "garage $* (node $node) failed: $out" >&2; exit 1
}
start_garage() { # sets garage_endpoints
  local rpc_secret i rpc s3 dir
  rpc_secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  garage_endpoints=()
  for i in 0 1 2; do
    dir=$work/garage/node$i
    mkdir -p "$dir"
    free_port; rpc=$port
    free_port; s3=$port
    # Garage refuses a config file with secrets that others can read.
    (
      umask 077
      cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$rpc_secret"
[s3_api]
s3_region = "$garage_region"
api_bind_addr = "127.0.0.1:$s3"
EOF
    )
    chmod 600 "$dir/garage.toml"
    # garage=info logs every S3 request (tests/src/garage.rs uses it); a
    # benchmark should not measure that.
    RUST_LOG=garage=warn NO_COLOR=1 "$garage" -c "$dir/garage.toml" server \
      </dev/null >/dev/null 2>>"$dir/garage.log" &
    pids+=($!)
    garage_endpoints+=("http://127.0.0.1:$s3")
  done
  local ids=() id
  for i in 0 1 2; do
    for _ in $(seq 1 150); do
      id=$("$garage" -c "$work/garage/node$i/garage.toml" node id -q 2>/dev/null || true)
      [[ $id == *@* ]] && break
      sleep 0.2
    done
    [[ $id == *@* ]] || { echo "garage node $i has no id" >&2; exit 1; }
    ids+=("$id")
  done
  garage_cli 0 node connect "${ids[1]}" >/dev/null
  garage_cli 0 node connect "${ids[2]}" >/dev/null
  for id in "${ids[@]}"; do
    garage_cli 0 layout assign -z dc1 -c 1G "${id%%@*}" >/dev/null
  done
  garage_cli 0 layout apply --version 1 >/dev/null
  garage_cli 0 key import -n kiln --yes "$garage_key" "$garage_secret" >/dev/null
  garage_cli 0 bucket create "$garage_bucket" >/dev/null
  garage_cli 0 bucket allow --read --write --owner "$garage_bucket" --key kiln >/dev/null
  # Every node knows the bucket and its S3 port accepts connections.
  for i in 0 1 2; do
    garage_cli "$i" bucket info "$garage_bucket" >/dev/null
    local port=${garage_endpoints[$i]##*:} ok=
    for _ in $(seq 1 300); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ok=1; break; fi
      sleep 0.1
    done
    [[ -n $ok ]] || { echo "garage node $i's S3 API does not answer" >&2; exit 1; }
  done
}

if want garage; then
  start_garage
  echo "## garage $("$garage" --version 2>&1 | head -1): 3 nodes, S3 at ${garage_endpoints[*]}"
  export AWS_ACCESS_KEY_ID=$garage_key AWS_SECRET_ACCESS_KEY=$garage_secret
  replica_runs garage "garage (3 nodes)" "$garage_bucket" "$garage_region" \
    "${garage_endpoints[0]}" "${garage_endpoints[1]}"
  log_summary "$work"/garage/node*/garage.log
fi
echo "## load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
