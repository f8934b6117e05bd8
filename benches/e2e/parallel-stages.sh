#!/usr/bin/env bash
# Parallel stages benchmark (issue 12): dockerfiles/parallel has two
# independent stages that each spend ~2 s of CPU in one RUN step and a final
# stage that copies from both. It is built with `--jobs 1` (one stage after
# another) and with the default (`--jobs` = the CPUs), interleaved round by
# round (1, default, then default, 1, ...), medians of the wall times
# reported. A build that overlaps its stages takes about max(stage), not
# sum(stage), when two cores are free.
#
# usage: benches/e2e/parallel-stages.sh [--runs N] [--spin N] [--json FILE]
#
#   --runs N     rounds (default 5; each contender once per round)
#   --spin N     awk loop iterations per stage (default: calibrated so one
#                stage's RUN takes ~2 s of CPU on this machine)
#   --json FILE  raw results, one JSON object a line (default
#                ./parallel-stages-results.jsonl); medians go to stdout
#
# Every run is cold for the steps (`--cache=false`, a new --cache-dir on a
# tmpfs) but the base is pulled from a local registry each time; no push
# (`--no-push`, `--digest-file`). The 1-minute load average is recorded
# before every run: on a shared machine, compare rounds, not single runs.
#
# Needs root and docker-registry, skopeo, umoci, busybox-static, jq, curl,
# time, iproute2.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)

RUNS=5
SPIN=""
JSON_OUT=$PWD/parallel-stages-results.jsonl
while [ "$#" -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift ;;
    --spin) SPIN=$2; shift ;;
    --json) JSON_OUT=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "parallel-stages.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$JSON_OUT" in /*) ;; *) JSON_OUT=$PWD/$JSON_OUT ;; esac

KILN_BIN_DIR=${KILN_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}
TIMEOUT=${KILN_E2E_TIMEOUT:-600}

log() { echo "[parallel-stages $(date +%H:%M:%S)] $*" >&2; }
die() { echo "parallel-stages.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
for tool in docker-registry skopeo umoci jq curl ss timeout busybox /usr/bin/time; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
[ -x "$KILN_BIN_DIR/kiln-executor" ] || die "$KILN_BIN_DIR/kiln-executor not found (set KILN_BIN_DIR)"

T=$(mktemp -d "${KILN_E2E_TMPDIR:-/var/tmp}/kiln-parallel.XXXXXX")
REG_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null; wait "$REG_PID" 2>/dev/null; fi
  local m
  findmnt -rn -o TARGET | awk -v p="$T/" 'index($0, p) == 1' | sort -r | while read -r m; do
    umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || true
  done
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    [ -z "$(ss -Htln "sport = :$p")" ] && { echo "$p"; return; }
  done
}

PORT=$(free_port)
mkdir -p "$T/registry"
cat >"$T/registry/config.yml" <<CONFIG
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $T/registry/storage
http:
  addr: 127.0.0.1:$PORT
CONFIG
docker-registry serve "$T/registry/config.yml" >"$T/registry/log" 2>&1 &
REG_PID=$!
REG="127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://$REG/v2/" 2>/dev/null && break; sleep 0.2; done
"$HERE/make-base.sh" small "${KILN_E2E_BASE_DIR:-$T/base}" "$REG" >"$T/base.log" 2>&1 || { cat "$T/base.log" >&2; die "base failed"; }

# Calibrate: SPIN iterations of the stage's awk loop take ~2 s of CPU.
if [ -z "$SPIN" ]; then
  probe=1000000
  cpu=$( { /usr/bin/time -f '%U %S' busybox awk -v n=$probe \
    'BEGIN { for (i = 0; i < n; i++) s += i % 7; print s }' >/dev/null; } 2>&1 | awk '{ print $1 + $2 }')
  SPIN=$(awk -v c="$cpu" -v p="$probe" 'BEGIN { printf "%d", (c > 0 ? 2.0 / c * p : 3000000) }')
fi
log "registry $REG; SPIN=$SPIN iterations per stage (~2 s of CPU each)"

CTX="$T/context"
mkdir -p "$CTX"
sed "s|@REGISTRY@|$REG|g" "$HERE/dockerfiles/parallel/Dockerfile" >"$CTX/Dockerfile"
cp "$KILN_BIN_DIR/kiln-executor" "$T/kiln-executor"

: >"$JSON_OUT"
run_one() {
  local jobs=$1 round=$2 state="$T/state-$1-$2" t0 t1 wall load rc
  mkdir -p "$state"
  mount -t tmpfs -o size=2g tmpfs "$state"
  local args=(--context "$CTX" --no-push --insecure-registry "$REG" --cache=false
    --cache-dir "$state" --build-arg "SPIN=$SPIN" --digest-file "$state/digest"
    --report "$state/report.json" --reproducible)
  [ "$jobs" = default ] || args+=(--jobs "$jobs")
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s%N)
  set +e
  /usr/bin/time -f '%U %S' -o "$state.cpu" timeout -k 30 "$TIMEOUT" "$T/kiln-executor" "${args[@]}" >"$state.log" 2>&1
  rc=$?
  set -e
  t1=$(date +%s%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  [ "$rc" -eq 0 ] || { log "FAILED (exit $rc): --jobs $jobs"; tail -n 20 "$state.log" >&2; }
  jq -cn --arg jobs "$jobs" --argjson round "$round" --argjson ok "$([ "$rc" -eq 0 ] && echo true || echo false)" \
    --argjson wall "$wall" --arg cpu "$(awk '{ print $1 + $2 }' "$state.cpu")" --arg load "$load" \
    --arg digest "$(cat "$state/digest" 2>/dev/null || true)" --argjson nproc "$(nproc)" \
    '{jobs: $jobs, round: $round, ok: $ok, wall_s: $wall, cpu_s: ($cpu | tonumber),
      load1_before: ($load | tonumber), digest: $digest, nproc: $nproc}' >>"$JSON_OUT"
  log "round $round --jobs $jobs: ${wall}s (load $load)"
  umount "$state"
  rm -rf "$state" "$state.cpu" "$state.log"
}

for round in $(seq 1 "$RUNS"); do
  if [ $((round % 2)) -eq 1 ]; then order="1 default"; else order="default 1"; fi
  for jobs in $order; do run_one "$jobs" "$round"; done
done

# Medians per contender, and whether every run gave the same image.
jq -s '
  def median: sort | if length == 0 then null
    elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  . as $all | ($all | group_by(.jobs) | map({
    jobs: .[0].jobs,
    runs: length,
    ok: (map(select(.ok)) | length),
    median_wall_s: (map(select(.ok) | .wall_s) | median),
    median_cpu_s: (map(select(.ok) | .cpu_s) | median),
    load1: (map(.load1_before) | median),
    nproc: .[0].nproc
  })) + [{same_digest: ($all | map(.digest) | unique | length == 1)}]' "$JSON_OUT"
