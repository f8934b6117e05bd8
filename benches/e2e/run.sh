#!/usr/bin/env bash
# End-to-end build benchmark: kiln-executor against Buildah, on a local
# registry, with the Dockerfiles in benches/e2e/dockerfiles/.
#
# usage: benches/e2e/run.sh [--quick] [--runs N] [--only "app small ..."]
#                           [--json FILE] [--no-buildah]
#
#   --quick       one run of each measurement (default: 3, medians reported)
#   --runs N      N runs of each measurement
#   --only LIST   Dockerfiles to build (default: small app multistage)
#   --json FILE   raw results (default: ./e2e-results.json)
#   --no-buildah  kiln only
#
# Environment:
#   KILN_BIN_DIR      where kiln-executor and kiln-cache-server are
#                     (default: $CARGO_TARGET_DIR/release or target/release);
#                     they are copied into the temporary directory first, so a
#                     rebuild during the run does not change them
#   KILN_E2E_TMPDIR   parent of the temporary directory (default /var/tmp)
#   KILN_E2E_BASE_DIR keep the base images' OCI layouts here between runs
#                     (default: inside the temporary directory, rebuilt each time)
#   KILN_E2E_TIMEOUT  seconds allowed to each build or push (default 1800)
#   KILN_E2E_FS_SIZE  size of each sparse ext4 image holding build state
#                     (default 30G; KILN_E2E_NO_LOOP=1 uses plain directories)
#
# For every repetition: a new docker-registry (Debian's Distribution) with
# empty storage on a free 127.0.0.1 port, into which make-base.sh pushes the
# two bases; for every Dockerfile a new kiln-cache-server with an empty data
# directory; then, each under /usr/bin/time -v (wall time and max RSS):
#   kiln cold      empty --cache-dir, empty cache server, push
#   kiln rebuild   one line of src/main.c changed, same --cache-dir, push
#   kiln fresh     new empty --cache-dir, warm cache server, same changed
#                  source, push to a registry that already has every blob
#   buildah cold   new --root/--runroot (vfs), build --layers, then push
#   buildah rebuild  same change, same storage, build --layers, then push
# Needs root, and: docker-registry, buildah, skopeo, umoci, busybox-static,
# jq, curl, time, util-linux (findmnt), iproute2 (ss).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)

RUNS=3
QUICK=0
ONLY="small app multistage"
JSON_OUT=$PWD/e2e-results.json
BUILDAH=1
while [ "$#" -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; RUNS=1 ;;
    --runs) RUNS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --json) JSON_OUT=$2; shift ;;
    --no-buildah) BUILDAH=0 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$JSON_OUT" in /*) ;; *) JSON_OUT=$PWD/$JSON_OUT ;; esac

TIMEOUT=${KILN_E2E_TIMEOUT:-1800}
KILN_BIN_DIR=${KILN_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}

log() { echo "[e2e $(date +%H:%M:%S)] $*" >&2; }
die() { echo "run.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (overlay mounts, namespaces, umoci unpack)"
for tool in docker-registry skopeo umoci jq curl findmnt ss timeout mkfs.ext4 /usr/bin/time; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if [ "$BUILDAH" -eq 1 ]; then command -v buildah >/dev/null || die "buildah not found (or use --no-buildah)"; fi
for b in kiln-executor kiln-cache-server; do
  [ -x "$KILN_BIN_DIR/$b" ] || die "$KILN_BIN_DIR/$b not found (set KILN_BIN_DIR)"
done

T=$(mktemp -d "${KILN_E2E_TMPDIR:-/var/tmp}/kiln-e2e.XXXXXX")
REG_PID=""
REG_LOG=/dev/null
REG_RC=0
CS_PID=""

unmount_under() {
  local m
  findmnt -rn -o TARGET | awk -v p="$1/" 'index($0, p) == 1' | sort -r | while read -r m; do
    umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || true
  done
}

stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
    : "$i"
  done
  kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$CS_PID"
  stop_pid "$REG_PID"
  unmount_under "$T"
  if [ -f "$T/loop-devices" ]; then
    local dev
    while read -r dev; do
      { losetup "$dev" 2>/dev/null | grep -q "$T/" && losetup -d "$dev"; } 2>/dev/null || true
    done <"$T/loop-devices" || true
  fi
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Build state lives on private ext4 file systems, each in a sparse file on a
# loop device (direct I/O, so the host does not cache the image a second
# time; no discard; no journal, like this machine's root). Deleting a
# 64k-file tree on a file system mounted with "discard" (the root here) took
# minutes and kept the disk busy during the next measurement, and a cold
# build started after another tool had filled the page cache and freed
# gigabytes on the same file system spent up to 30 s more in the kernel.
# So each tool gets a new file system for each Dockerfile and run, dropped
# (unmounted, detached, deleted) afterwards.
declare -A FS_DEV FS_IMG
FS_SEQ=0
new_fs() {
  local dir=$1 img dev
  mkdir -p "$dir"
  [ -z "${KILN_E2E_NO_LOOP:-}" ] || return 0
  FS_SEQ=$((FS_SEQ + 1))
  img="$T/fs-$FS_SEQ.img"
  truncate -s "${KILN_E2E_FS_SIZE:-30G}" "$img"
  mkfs.ext4 -q -E nodiscard -O ^has_journal "$img"
  dev=$(losetup --direct-io=on --show -f "$img")
  echo "$dev" >>"$T/loop-devices"
  mount -o nodiscard "$dev" "$dir"
  FS_DEV[$dir]=$dev
  FS_IMG[$dir]=$img
}
drop_fs() {
  local dir=$1
  unmount_under "$dir"
  if [ -n "${FS_DEV[$dir]:-}" ]; then
    umount "$dir" 2>/dev/null || umount -l "$dir"
    losetup -d "${FS_DEV[$dir]}" 2>/dev/null || true
    rm -f "${FS_IMG[$dir]}"
    unset "FS_DEV[$dir]" "FS_IMG[$dir]"
  fi
  rm -rf "$dir"
  sync
  sleep 1
}
W="$T/w"
new_fs "$W"
mkdir -p "$W/bin" "$W/tmp" "$W/bases"
cp "$KILN_BIN_DIR/kiln-executor" "$KILN_BIN_DIR/kiln-cache-server" "$W/bin/"
KILN="$W/bin/kiln-executor"
KILN_CS="$W/bin/kiln-cache-server"
BASE_DIR=${KILN_E2E_BASE_DIR:-$W/bases}
RESULTS="${JSON_OUT%.json}.raw.jsonl"
: >"$RESULTS"

# Buildah configuration private to this run.
cat >"$T/policy.json" <<'EOF'
{"default": [{"type": "insecureAcceptAnything"}]}
EOF
cat >"$T/registries.conf" <<'EOF'
unqualified-search-registries = []
short-name-mode = "permissive"
EOF
export CONTAINERS_REGISTRIES_CONF="$T/registries.conf"

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if [ -z "$(ss -Htln "sport = :$p")" ]; then
      echo "$p"
      return
    fi
  done
}

wait_http() {
  local url=$1 i
  for i in $(seq 1 100); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.2
    : "$i"
  done
  return 1
}

start_registry() {
  local dir=$1 port
  port=$(free_port)
  mkdir -p "$dir/storage"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  REG_PID=$!
  REG_LOG="$dir/registry.log"
  REG="127.0.0.1:$port"
  wait_http "http://$REG/v2/" || die "registry did not start (see $dir/registry.log)"
}

start_cache_server() {
  local dir=$1
  mkdir -p "$dir/data"
  rm -f "$dir/port"
  "$KILN_CS" --listen 127.0.0.1:0 --data "$dir/data" --port-file "$dir/port" >"$dir/cache-server.log" 2>&1 &
  CS_PID=$!
  local i
  for i in $(seq 1 100); do
    [ -s "$dir/port" ] && break
    sleep 0.1
    : "$i"
  done
  [ -s "$dir/port" ] || die "kiln-cache-server did not start (see $dir/cache-server.log)"
  CS_URL="http://127.0.0.1:$(cat "$dir/port")"
  wait_http "$CS_URL/healthz" || die "kiln-cache-server not healthy (see $dir/cache-server.log)"
}

# Removes a directory tree outside the measurements, then lets the disk settle
# (deleting tens of thousands of files keeps ext4 busy for a while).
drop_tree() {
  unmount_under "$1"
  rm -rf "$1"
  sync
  sleep 2
}

# measure LOG CMD...: runs CMD under /usr/bin/time -v and timeout; sets
# M_WALL (seconds), M_RSS (KiB, max over the process tree) and M_RC.
measure() {
  local logf=$1
  shift
  local t0 t1
  sync
  M_LOAD=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s%N)
  set +e
  /usr/bin/time -v -o "$logf.time" timeout -k 30 "$TIMEOUT" "$@" >"$logf" 2>&1
  M_RC=$?
  set -e
  t1=$(date +%s%N)
  M_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  M_RSS=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$logf.time")
  M_RSS=${M_RSS:-0}
  M_USER=$(awk -F': ' '/User time/ { print $2 }' "$logf.time")
  M_SYS=$(awk -F': ' '/System time/ { print $2 }' "$logf.time")
  M_USER=${M_USER:-0}
  # "File system outputs" counts 512-byte blocks written by the process tree.
  M_WRITTEN=$(awk -F': ' '/File system outputs/ { print $2 * 512 }' "$logf.time")
  M_WRITTEN=${M_WRITTEN:-0}
  M_SYS=${M_SYS:-0}
  if [ "$M_RC" -ne 0 ]; then
    log "FAILED (exit $M_RC): $*"
    tail -n 20 "$logf" >&2 || true
  fi
  check_registry
}

# The registry must outlive every measurement; if it died the numbers are void.
check_registry() {
  if [ -n "$REG_PID" ] && ! kill -0 "$REG_PID" 2>/dev/null; then
    wait "$REG_PID" 2>/dev/null && REG_RC=0 || REG_RC=$?
    log "docker-registry (pid $REG_PID) exited with status $REG_RC; its log:"
    tail -n 30 "$REG_LOG" >&2 || true
    REG_PID=""
    die "registry died during the run"
  fi
}

# record KEY=VALUE...: appends one JSON object to the raw results.
record() {
  local args=() kv k v
  for kv in "$@"; do
    k=${kv%%=*}
    v=${kv#*=}
    args+=(--arg "$k" "$v")
  done
  jq -cn "${args[@]}" '$ARGS.named
    | with_entries(.value |= (if test("^-?[0-9]+(\\.[0-9]+)?$") then tonumber else . end))' >>"$RESULTS"
}

layers_of() {
  skopeo inspect --tls-verify=false "docker://$1" 2>/dev/null | jq '.Layers | length' 2>/dev/null || echo 0
}

mounts_under() {
  findmnt -rn -o TARGET | awk -v p="$1/" 'index($0, p) == 1' | wc -l
}

prepare_context() {
  local name=$1 ctx=$2
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp -a "$HERE/src" "$ctx/src"
  sed "s|@REGISTRY@|$REG|g" "$HERE/dockerfiles/$name/Dockerfile" >"$ctx/Dockerfile"
}

# The one-line source change.
change_line() {
  sed -i "s|^#define BUILD_TAG .*|#define BUILD_TAG \"changed-$2\"|" "$1/src/main.c"
  grep -q "changed-$2" "$1/src/main.c" || die "one-line change did not apply"
}

kiln_phase() {
  local name=$1 run=$2 phase=$3 ctx=$4 cdir=$5 dir=$6
  local report="$dir/kiln-$phase.report.json"
  local dest="$REG/$name:kiln-$phase"
  log "$name run $run: kiln $phase"
  measure "$dir/kiln-$phase.log" "$KILN" --context "$ctx" --dockerfile "$ctx/Dockerfile" \
    --destination "$dest" --insecure-registry "$REG" --cache-dir "$cdir" \
    --cache-server "$CS_URL" --report "$report" --isolation chroot
  local steps=0 hits=0 misses=0 up=0 down=0 layers=0 left
  if [ "$M_RC" -eq 0 ] && [ -s "$report" ]; then
    steps=$(jq '.summary.steps // 0' "$report")
    hits=$(jq '.summary.hits // 0' "$report")
    misses=$(jq '.summary.misses // 0' "$report")
    up=$(jq '.summary.bytes_uploaded // 0' "$report")
    down=$(jq '.summary.bytes_downloaded // 0' "$report")
    layers=$(layers_of "$dest")
  fi
  left=$(mounts_under "$cdir")
  record dockerfile="$name" run="$run" tool=kiln phase="$phase" ok="$([ "$M_RC" -eq 0 ] && echo true || echo false)" \
    rc="$M_RC" load1_before="$M_LOAD" wall_s="$M_WALL" user_s="$M_USER" sys_s="$M_SYS" fs_written_bytes="$M_WRITTEN" max_rss_kb="$M_RSS" steps="$steps" hits="$hits" misses="$misses" \
    bytes_uploaded="$up" bytes_downloaded="$down" layers="$layers" mounts_left="$left" push=included
  log "  kiln $phase: ${M_WALL}s, max RSS ${M_RSS} KiB, hits $hits/$steps, up $up B, down $down B (from the cache), $M_WRITTEN B written to disk, mounts left $left"
}

buildah_phase() {
  local name=$1 run=$2 phase=$3 ctx=$4 bdir=$5 dir=$6
  local b=(buildah --root "$bdir/root" --runroot "$bdir/runroot" --storage-driver vfs)
  local dest="$REG/$name-buildah:$phase"
  mkdir -p "$bdir/tmp"
  log "$name run $run: buildah $phase (build)"
  TMPDIR="$bdir/tmp" measure "$dir/buildah-$phase-build.log" "${b[@]}" build --layers --isolation chroot \
    --tls-verify=false --signature-policy "$T/policy.json" -f "$ctx/Dockerfile" -t "localhost/$name:bench" "$ctx"
  local bload=$M_LOAD bwall=$M_WALL brss=$M_RSS brc=$M_RC bcpu pwall=0 prss=0 prc=1 pcpu=0 layers=0
  bcpu=$(awk -v a="$M_USER" -v b="$M_SYS" 'BEGIN { printf "%.2f", a + b }')
  if [ "$brc" -eq 0 ]; then
    log "$name run $run: buildah $phase (push)"
    TMPDIR="$bdir/tmp" measure "$dir/buildah-$phase-push.log" "${b[@]}" push --tls-verify=false \
      --signature-policy "$T/policy.json" "localhost/$name:bench" "docker://$dest"
    pwall=$M_WALL prss=$M_RSS prc=$M_RC
    pcpu=$(awk -v a="$M_USER" -v b="$M_SYS" 'BEGIN { printf "%.2f", a + b }')
    [ "$prc" -eq 0 ] && layers=$(layers_of "$dest")
  fi
  local ok=false total rss
  [ "$brc" -eq 0 ] && [ "$prc" -eq 0 ] && ok=true
  total=$(awk -v a="$bwall" -v b="$pwall" 'BEGIN { printf "%.3f", a + b }')
  rss=$(( brss > prss ? brss : prss ))
  record dockerfile="$name" run="$run" tool=buildah phase="$phase" ok="$ok" rc="$brc" push_rc="$prc" \
    load1_before="$bload" wall_s="$total" build_s="$bwall" push_s="$pwall" build_cpu_s="$bcpu" push_cpu_s="$pcpu" max_rss_kb="$rss" build_max_rss_kb="$brss" \
    push_max_rss_kb="$prss" layers="$layers" push=included
  log "  buildah $phase: build ${bwall}s + push ${pwall}s = ${total}s, max RSS ${rss} KiB"
}

START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "temporary directory $T; runs: $RUNS; Dockerfiles: $ONLY; buildah: $BUILDAH"

for run in $(seq 1 "$RUNS"); do
  RDIR="$W/run$run"
  mkdir -p "$RDIR"
  start_registry "$RDIR/registry"
  log "run $run: registry $REG; making bases"
  "$HERE/make-base.sh" small "$BASE_DIR/small" "$REG" >"$RDIR/base-small.log" 2>&1 || { cat "$RDIR/base-small.log" >&2; die "small base failed"; }
  case " $ONLY " in
    *" app "*|*" multistage "*)
      "$HERE/make-base.sh" big "$BASE_DIR/big" "$REG" >"$RDIR/base-big.log" 2>&1 || { cat "$RDIR/base-big.log" >&2; die "big base failed"; }
      ;;
  esac

  for name in $ONLY; do
    [ -f "$HERE/dockerfiles/$name/Dockerfile" ] || die "no Dockerfile for $name"
    D="$RDIR/$name"
    mkdir -p "$D"
    CTX="$D/context"

    # kiln: cold, rebuild after a one-line change, fresh executor.
    new_fs "$D/kiln"
    start_cache_server "$D/cache-server"
    prepare_context "$name" "$CTX"
    kiln_phase "$name" "$run" cold "$CTX" "$D/kiln/state-a" "$D"
    if [ "$M_RC" -eq 0 ]; then
      change_line "$CTX" "$run"
      kiln_phase "$name" "$run" rebuild "$CTX" "$D/kiln/state-a" "$D"
      kiln_phase "$name" "$run" fresh "$CTX" "$D/kiln/state-b" "$D"
    fi
    stop_pid "$CS_PID"
    CS_PID=""
    drop_fs "$D/kiln"

    if [ "$BUILDAH" -eq 1 ]; then
      prepare_context "$name" "$CTX"
      new_fs "$D/buildah"
      buildah_phase "$name" "$run" cold "$CTX" "$D/buildah" "$D"
      change_line "$CTX" "$run"
      buildah_phase "$name" "$run" rebuild "$CTX" "$D/buildah" "$D"
      drop_fs "$D/buildah"
    fi
    # Keep the logs and reports of the last run for inspection on failure.
    if [ -n "${KILN_E2E_KEEP_LOGS:-}" ]; then
      mkdir -p "$KILN_E2E_KEEP_LOGS/run$run/$name"
      cp "$D"/*.log "$D"/*.json "$KILN_E2E_KEEP_LOGS/run$run/$name/" 2>/dev/null || true
    fi
  done
  stop_pid "$REG_PID"
  REG_PID=""
  drop_tree "$RDIR/registry"
done
END=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# Raw numbers, medians and the Markdown tables.
E2E_RUNS=$RUNS E2E_QUICK=$QUICK E2E_KILN_SHA="$(sha256sum "$KILN" | cut -c1-16)" \
  E2E_BUILDAH="$( [ "$BUILDAH" -eq 1 ] && buildah --version || echo none)" \
  "$HERE/summarize.sh" "$RESULTS" "$JSON_OUT" "$ONLY" "$START" "$END"
log "raw results: $JSON_OUT (one line per measurement: $RESULTS)"
