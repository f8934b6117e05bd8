#!/usr/bin/env bash
# "Fat base" cold-build benchmark (issue 16): a Dockerfile FROM the big base
# (make-base.sh big: ~800 MB, 64k files, one gzip layer) with five small
# RUN/COPY steps (dockerfiles/fat), built cold by up to three contenders,
# interleaved round by round (A B C, then C B A, ...), medians reported:
#
#   kiln      the kiln-executor under test ($KILN_BIN_DIR)
#   baseline  an older kiln-executor binary ($KILN_BASELINE, default
#             /var/cache/kiln/baseline/kiln-executor-36e3837)
#   buildah   buildah with OVERLAY storage and --isolation chroot, build +
#             push timed together
#
# usage: benches/e2e/fat-base.sh [--runs N] [--tmpfs | --disk] [--warm]
#                                [--no-buildah] [--no-baseline] [--json FILE]
#
#   --runs N       rounds (default 5; every contender runs once per round)
#   --tmpfs        build state on a tmpfs instead of a new ext4 file system
#   --disk         build state in a new plain directory on the file system
#                  of $KILN_E2E_TMPDIR (default /var/tmp: the root disk, with
#                  its journal, where a build pod's --cache-dir would be, and
#                  where issue 16's "today" numbers were taken), removed
#                  after each run
#   --warm         after each kiln contender's cold run, a second build on
#                  the same state with --cache=false (the steps run again
#                  over the base this node already has: kiln mounts its
#                  stored image, checked by its stamp), as TOOL-warm
#   --json FILE    raw results, one JSON object a line (default
#                  ./fat-base-results.jsonl), kiln's build logs beside it
#                  (FILE without .jsonl, .TOOL-ROUND.log); medians go to
#                  stdout as a table (wall, RSS, CPU, kiln's phases, load)
#
# Every run is cold: a new, empty file system (ext4 on a sparse loop image,
# or a tmpfs) or a new directory (--disk) for the tool's state, an empty --cache-dir (kiln's embedded
# cache), a new destination repository. All contenders' state is on the
# same kind of file system on the same disk. Each run is measured with
# /usr/bin/time -v (wall time, peak RSS of the process tree, CPU time).
# kiln's "base materialization" is measured separately per round with the
# unpack_file example ($UNPACK_FILE, default $KILN_BIN_DIR/examples/
# unpack_file) unpacking the pulled base layer into an empty directory on
# the same kind of file system, when that example is built.
# The floor is measured per round too: `gzip -dc` of the base layer alone
# (gunzip-base), kiln's own decoder alone (`unpack_file --inflate`,
# inflate-base), and, from each kiln run's --report and log, the base's
# materialization (pull + convert or unpack + mount: base_ms), the RUN/COPY
# steps' own time (run_ms), their snapshots (snapshot_ms) and the rest
# (push, config, setup: other_ms). The load average is recorded before every
# run and printed with the medians.
# KILN_E2E_DROP_CACHES=1 drops the page cache before every run (quiet
# machines only). KILN_E2E_STRACE=1 runs the kiln contenders under
# `strace -f -c -w` (syscall counts and wall time per syscall, written next
# to the JSON as <tool>-<round>.strace; timings are then not comparable).
#
# Needs root and docker-registry, buildah, skopeo, umoci, busybox-static, jq,
# curl, time, util-linux, iproute2, e2fsprogs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)

RUNS=5
TMPFS=0
DISK=0
WARM=0
BUILDAH=1
BASELINE=1
JSON_OUT=$PWD/fat-base-results.jsonl
while [ "$#" -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift ;;
    --tmpfs) TMPFS=1 ;;
    --disk) DISK=1 ;;
    --warm) WARM=1 ;;
    --no-buildah) BUILDAH=0 ;;
    --no-baseline) BASELINE=0 ;;
    --json) JSON_OUT=$2; shift ;;
    -h|--help) sed -n '2,54p' "$0"; exit 0 ;;
    *) echo "fat-base.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$JSON_OUT" in /*) ;; *) JSON_OUT=$PWD/$JSON_OUT ;; esac
if [ "$DISK" -eq 1 ] && [ "$TMPFS" -eq 1 ]; then
  echo "fat-base.sh: --tmpfs and --disk exclude each other" >&2
  exit 2
fi

KILN_BIN_DIR=${KILN_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}
KILN_BASELINE=${KILN_BASELINE:-/var/cache/kiln/baseline/kiln-executor-36e3837}
UNPACK_FILE=${UNPACK_FILE:-$KILN_BIN_DIR/examples/unpack_file}
TIMEOUT=${KILN_E2E_TIMEOUT:-1800}

log() { echo "[fat-base $(date +%H:%M:%S)] $*" >&2; }
die() { echo "fat-base.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
for tool in docker-registry skopeo umoci jq curl ss timeout mkfs.ext4 losetup /usr/bin/time; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
[ -x "$KILN_BIN_DIR/kiln-executor" ] || die "$KILN_BIN_DIR/kiln-executor not found (set KILN_BIN_DIR)"
if [ "$BUILDAH" -eq 1 ]; then command -v buildah >/dev/null || die "buildah not found (or --no-buildah)"; fi
if [ "$BASELINE" -eq 1 ]; then [ -x "$KILN_BASELINE" ] || die "$KILN_BASELINE not found (or --no-baseline)"; fi

T=$(mktemp -d "${KILN_E2E_TMPDIR:-/var/tmp}/kiln-fat.XXXXXX")
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
  if [ -f "$T/loop-devices" ]; then
    while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done <"$T/loop-devices"
  fi
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A new file system for one run's state: ext4 on a sparse image (no
# journal, no discard, direct I/O loop: see run.sh for why) or a tmpfs.
new_fs() {
  local dir=$1
  mkdir -p "$dir"
  # --disk: no mount, the state is on the file system $T is on.
  [ "$DISK" -eq 1 ] && return
  if [ "$TMPFS" -eq 1 ]; then
    mount -t tmpfs -o size=12g tmpfs "$dir"
    return
  fi
  local img="$dir.img" dev
  truncate -s 30G "$img"
  mkfs.ext4 -q -E nodiscard -O ^has_journal "$img"
  dev=$(losetup --direct-io=on --show -f "$img")
  echo "$dev" >>"$T/loop-devices"
  mount -o nodiscard "$dev" "$dir"
  echo "$dev" >"$dir.dev"
}
drop_fs() {
  local dir=$1 m
  findmnt -rn -o TARGET | awk -v p="$dir/" 'index($0, p) == 1' | sort -r | while read -r m; do
    umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || true
  done
  if [ "$DISK" -eq 0 ]; then umount "$dir" 2>/dev/null || umount -l "$dir"; fi
  if [ -f "$dir.dev" ]; then
    losetup -d "$(cat "$dir.dev")" 2>/dev/null || true
    rm -f "$dir.dev" "$dir.img"
  fi
  rm -rf "$dir"
  sync
  sleep 2
}

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    [ -z "$(ss -Htln "sport = :$p")" ] && { echo "$p"; return; }
  done
}

# measure NAME CMD...: sets M_WALL (s), M_RSS (KiB), M_CPU (s), M_RC.
measure() {
  local logf=$1 t0 t1
  shift
  sync
  # Off by default: on a shared machine it slows everyone else down.
  if [ -n "${KILN_E2E_DROP_CACHES:-}" ]; then echo 3 >/proc/sys/vm/drop_caches; fi
  M_LOAD=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s%N)
  set +e
  /usr/bin/time -v -o "$logf.time" timeout -k 30 "$TIMEOUT" "$@" >"$logf" 2>&1
  M_RC=$?
  set -e
  t1=$(date +%s%N)
  M_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  M_RSS=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$logf.time")
  M_CPU=$(awk -F': ' '/User time/ { u = $2 } /System time/ { s = $2 } END { printf "%.2f", u + s }' "$logf.time")
  M_RSS=${M_RSS:-0}
  [ "$M_RC" -eq 0 ] || { log "FAILED (exit $M_RC): $*"; tail -n 20 "$logf" >&2 || true; }
}

record() { # tool round ok wall rss cpu load [phases-json]
  jq -cn --arg tool "$1" --argjson round "$2" --argjson ok "$3" --argjson wall "$4" \
    --argjson rss "$5" --argjson cpu "$6" --arg load "$7" --arg fs "$FS_KIND" \
    --argjson phases "${8:-null}" \
    '{tool: $tool, round: $round, ok: $ok, wall_s: $wall, max_rss_kb: $rss, cpu_s: $cpu,
      load1_before: ($load | tonumber), fs: $fs} + ($phases // {})' >>"$JSON_OUT"
}

# phases REPORT LOG: a kiln run's phases in ms as JSON (null fields when the
# report or the log line is missing: an older binary may not log them).
phases() {
  local base_ms
  base_ms=$(grep -oE 'mounted image .* in [0-9]+ ms' "$2" 2>/dev/null | grep -oE '[0-9]+ ms$' | awk '{ s += $1 } END { if (NR) print s; else print "null" }')
  [ -f "$1" ] || { echo "{\"base_ms\": $base_ms}"; return; }
  jq -c --argjson base "$base_ms" '
    ([.steps[] | .durations_ms.run // 0] | add) as $run
    | ([.steps[] | .durations_ms.snapshot // 0] | add) as $snap
    | {base_ms: $base, run_ms: $run, snapshot_ms: $snap,
       total_ms: .summary.duration_ms,
       other_ms: (if $base == null then null else .summary.duration_ms - $base - $run - $snap end)}
  ' "$1" 2>/dev/null || echo "{\"base_ms\": $base_ms}"
}

FS_KIND=$([ "$TMPFS" -eq 1 ] && echo tmpfs || echo ext4-loop)
[ "$DISK" -eq 1 ] && FS_KIND="disk-$(findmnt -n -o FSTYPE --target "$T")"

: >"$JSON_OUT"
mkdir -p "$T/bin"
cp "$KILN_BIN_DIR/kiln-executor" "$T/bin/kiln-executor"
[ "$BASELINE" -eq 1 ] && cp "$KILN_BASELINE" "$T/bin/kiln-baseline"
[ -x "$UNPACK_FILE" ] && cp "$UNPACK_FILE" "$T/bin/unpack_file"

# One registry for the whole benchmark: the base is pushed once; every run
# pushes to a new repository.
PORT=$(free_port)
mkdir -p "$T/registry"
cat >"$T/registry/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $T/registry/storage
http:
  addr: 127.0.0.1:$PORT
EOF
docker-registry serve "$T/registry/config.yml" >"$T/registry/log" 2>&1 &
REG_PID=$!
REG="127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://$REG/v2/" 2>/dev/null && break; sleep 0.2; done
log "registry $REG; making the big base (slow the first time; KILN_E2E_BASE_DIR keeps it)"
"$HERE/make-base.sh" big "${KILN_E2E_BASE_DIR:-$T/base}" "$REG" >"$T/base.log" 2>&1 || { cat "$T/base.log" >&2; die "base failed"; }
BASE_LAYER=$(skopeo inspect --tls-verify=false "docker://$REG/base:latest" | jq -r '.Layers[0]')
BASE_BLOB="$T/registry/storage/docker/registry/v2/blobs/sha256/${BASE_LAYER:7:2}/${BASE_LAYER:7}/data"
log "base layer $BASE_LAYER: $(stat -c %s "$BASE_BLOB") bytes"

CTX="$T/context"
mkdir -p "$CTX"
cp -a "$HERE/src" "$CTX/src"
sed "s|@REGISTRY@|$REG|g" "$HERE/dockerfiles/fat/Dockerfile" >"$CTX/Dockerfile"
cat >"$T/policy.json" <<'EOF'
{"default": [{"type": "insecureAcceptAnything"}]}
EOF
printf 'unqualified-search-registries = []\nshort-name-mode = "permissive"\n' >"$T/registries.conf"
export CONTAINERS_REGISTRIES_CONF="$T/registries.conf"

run_kiln() { # tool binary round
  local tool=$1 bin=$2 round=$3 dir="$T/state"
  new_fs "$dir"
  log "round $round: $tool"
  local wrap=()
  [ -n "${KILN_E2E_STRACE:-}" ] && wrap=(strace -f -c -w -o "${JSON_OUT%.jsonl}.$tool-$round.strace")
  measure "$T/$tool-$round.log" "${wrap[@]}" "$bin" --context "$CTX" --dockerfile "$CTX/Dockerfile" \
    --destination "$REG/fat-$tool-$round:latest" --insecure-registry "$REG" \
    --cache-dir "$dir/cache" --isolation chroot --report "$dir/report.json"
  local ph
  ph=$(phases "$dir/report.json" "$T/$tool-$round.log")
  record "$tool" "$round" "$([ "$M_RC" -eq 0 ] && echo true || echo false)" "$M_WALL" "$M_RSS" "$M_CPU" "$M_LOAD" "$ph"
  log "  $tool: ${M_WALL}s, peak RSS ${M_RSS} KiB, CPU ${M_CPU}s, phases $ph"
  # The build log stays next to the JSON (its "mounted image … in N ms"
  # lines break the base down further).
  cp "$T/$tool-$round.log" "${JSON_OUT%.jsonl}.$tool-$round.log" 2>/dev/null || true
  if [ "$WARM" -eq 1 ] && [ "$M_RC" -eq 0 ]; then
    rm -f "$dir/report.json"
    measure "$T/$tool-warm-$round.log" "${wrap[@]}" "$bin" --context "$CTX" --dockerfile "$CTX/Dockerfile" \
      --destination "$REG/fat-$tool-warm-$round:latest" --insecure-registry "$REG" \
      --cache-dir "$dir/cache" --isolation chroot --cache=false --report "$dir/report.json"
    ph=$(phases "$dir/report.json" "$T/$tool-warm-$round.log")
    record "$tool-warm" "$round" "$([ "$M_RC" -eq 0 ] && echo true || echo false)" "$M_WALL" "$M_RSS" "$M_CPU" "$M_LOAD" "$ph"
    log "  $tool warm: ${M_WALL}s, peak RSS ${M_RSS} KiB, CPU ${M_CPU}s, phases $ph"
    cp "$T/$tool-warm-$round.log" "${JSON_OUT%.jsonl}.$tool-warm-$round.log" 2>/dev/null || true
  fi
  drop_fs "$dir"
}

run_buildah() { # round
  local round=$1 dir="$T/state"
  new_fs "$dir"
  mkdir -p "$dir/tmp"
  local b=(buildah --root "$dir/root" --runroot "$dir/runroot" --storage-driver overlay)
  log "round $round: buildah (overlay)"
  # Build and push in one measured shell, as kiln's time includes its push.
  TMPDIR="$dir/tmp" measure "$T/buildah-$round.log" sh -c '
    "$@" build --layers --isolation chroot --tls-verify=false --signature-policy "$P" \
      -f "$C/Dockerfile" -t localhost/fat:bench "$C" &&
    "$@" push --tls-verify=false --signature-policy "$P" localhost/fat:bench "docker://$D"' \
    sh "${b[@]}"
  record buildah "$round" "$([ "$M_RC" -eq 0 ] && echo true || echo false)" "$M_WALL" "$M_RSS" "$M_CPU" "$M_LOAD"
  log "  buildah: ${M_WALL}s, peak RSS ${M_RSS} KiB, CPU ${M_CPU}s"
  drop_fs "$dir"
}
export P="$T/policy.json" C="$CTX"

run_unpack() { # round: kiln's unpacker alone on the base layer
  local round=$1 dir="$T/state"
  [ -x "$T/bin/unpack_file" ] || return 0
  new_fs "$dir"
  measure "$T/unpack-$round.log" "$T/bin/unpack_file" "$dir/rootfs" "$BASE_BLOB"
  record unpack-base "$round" "$([ "$M_RC" -eq 0 ] && echo true || echo false)" "$M_WALL" "$M_RSS" "$M_CPU" "$M_LOAD"
  log "  base unpack alone: ${M_WALL}s, peak RSS ${M_RSS} KiB"
  drop_fs "$dir"
}

run_gunzip() { # round: the floor of the base's decompression, one core
  local round=$1
  measure "$T/gunzip-$round.log" sh -c 'gzip -dc "$1" >/dev/null' sh "$BASE_BLOB"
  record gunzip-base "$round" "$([ "$M_RC" -eq 0 ] && echo true || echo false)" "$M_WALL" "$M_RSS" "$M_CPU" "$M_LOAD"
  log "  gzip -dc of the base layer alone: ${M_WALL}s"
  [ -x "$T/bin/unpack_file" ] || return 0
  measure "$T/inflate-$round.log" "$T/bin/unpack_file" --inflate "$BASE_BLOB"
  record inflate-base "$round" "$([ "$M_RC" -eq 0 ] && echo true || echo false)" "$M_WALL" "$M_RSS" "$M_CPU" "$M_LOAD"
  log "  kiln's decoder on the base layer alone (unpack_file --inflate): ${M_WALL}s"
}

CONTENDERS=(kiln)
[ "$BASELINE" -eq 1 ] && CONTENDERS+=(baseline)
[ "$BUILDAH" -eq 1 ] && CONTENDERS+=(buildah)
log "rounds: $RUNS; contenders: ${CONTENDERS[*]}; state on $FS_KIND; load: $(cat /proc/loadavg)"
for round in $(seq 1 "$RUNS"); do
  order=("${CONTENDERS[@]}")
  if [ $((round % 2)) -eq 0 ]; then
    order=()
    for ((i = ${#CONTENDERS[@]} - 1; i >= 0; i--)); do order+=("${CONTENDERS[$i]}"); done
  fi
  for c in "${order[@]}"; do
    case "$c" in
      kiln) run_kiln kiln "$T/bin/kiln-executor" "$round" ;;
      baseline) run_kiln baseline "$T/bin/kiln-baseline" "$round" ;;
      buildah) D="$REG/fat-buildah-$round:latest" && export D && run_buildah "$round" ;;
    esac
  done
  run_unpack "$round"
  run_gunzip "$round"
done
log "done; load: $(cat /proc/loadavg)"

# Medians per contender (successful runs only).
jq -rs '
  def median: sort | if length == 0 then null
    elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end
    | if . == null then . else . * 100 | round / 100 end;
  group_by(.tool)[] | select(map(select(.ok)) | length > 0)
  | (map(select(.ok))) as $ok
  | def ms(f): ($ok | map(f | select(. != null)) | if length == 0 then "–" else "\(median / 1000 * 100 | round / 100) s" end);
  "| \(.[0].tool) | \($ok | length)/\(length) | \($ok | map(.wall_s) | median) s | \($ok | map(.max_rss_kb / 1024 | floor) | median) MiB | \($ok | map(.cpu_s) | median) s | \(ms(.base_ms)) | \(ms(.run_ms)) | \(ms(.snapshot_ms)) | \(ms(.other_ms)) | \($ok | map(.load1_before) | median) |"
' "$JSON_OUT" | { echo "| contender | ok runs | median wall | median peak RSS | median CPU | base | RUN/COPY | snapshots | other | load1 |"; echo "|---|---|---|---|---|---|---|---|---|---|"; cat; }
