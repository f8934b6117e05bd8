#!/usr/bin/env bash
# Checks the images deploy/build-images.sh wrote as OCI layouts, with tools
# that are not kiln: skopeo reads each layout, its config and its layers, and
# buildah runs the binaries inside each image.
#
#   deploy/check-images.sh [--version V] LAYOUT_DIR
#
# LAYOUT_DIR holds executor/, executor-debug/ and cache-server/, tagged
# VERSION (VERSION-debug), as `build-images.sh --oci-layout LAYOUT_DIR`
# writes them. Buildah uses private storage (vfs) and run directories in a
# temporary directory that is removed on exit, with its containers; nothing
# touches the host's container storage. Runs as root (as CI does).
#
# Options:
#   --version V   the tag to check (default: the workspace version)
#   -h, --help    this text
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "check-images: $*" >&2; exit 1; }
ok() { echo "check-images: ok  $*" >&2; }

repo_root=$(cd "$(dirname "$0")/.." && pwd)
version=""
layout_dir=""
while (($#)); do
  case "$1" in
    --version) version=${2:?--version needs a value}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) [[ -z "$layout_dir" ]] || die "one LAYOUT_DIR only"; layout_dir=$1; shift ;;
  esac
done
[[ -n "$layout_dir" ]] || { usage >&2; die "give the LAYOUT_DIR"; }
[[ -d "$layout_dir" ]] || die "no directory $layout_dir"
layout_dir=$(cd "$layout_dir" && pwd)
if [[ -z "$version" ]]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' "$repo_root/Cargo.toml")
  [[ -n "$version" ]] || die "cannot read the workspace version from Cargo.toml; use --version"
fi
for tool in skopeo buildah jq tar; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/prereqs.sh installs it)"
done
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kiln-check-images.XXXXXX")
bah=(buildah --storage-driver vfs --root "$tmp/root" --runroot "$tmp/runroot")
cleanup() {
  "${bah[@]}" rm --all >/dev/null 2>&1 || true
  # Whatever buildah may have left mounted under our directory, innermost
  # first, before removing it.
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v t="$tmp" 'index($5, t) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  rm -rf "$tmp"
}
trap cleanup EXIT
# Local layouts only: no signatures to verify, whatever the host's policy.
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$tmp/policy.json"

# expect WHAT ACTUAL WANTED
expect() {
  [[ "$2" == "$3" ]] || die "$1: got '$2', want '$3'"
}

# files NAME TAG: every path in the image's layers, one a line, without a
# leading ./ or /.
files() {
  local dir=$layout_dir/$1 tag=$2 manifest layer
  manifest=$(jq -r --arg t "$tag" \
    '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$dir/index.json")
  [[ -n "$manifest" ]] || die "$1: no image tagged $tag in $dir/index.json"
  while read -r layer; do
    tar -tf "$dir/blobs/${layer/://}"
  done < <(jq -r '.layers[].digest' "$dir/blobs/${manifest/://}") | sed 's|^\./||; s|^/||; /^$/d' | sort -u
}

# run_expect NAME TAG REGEX -- COMMAND...: runs COMMAND in a fresh container
# of the image (as the image's user); its output must have a line matching
# REGEX. One retry, reported: once on this machine buildah returned success
# with the output missing, which says nothing about the image.
run_expect() {
  local ref="oci:$layout_dir/$1:$2" regex=$3 ctr attempt rc
  shift 4
  for attempt in 1 2; do
    ctr=$("${bah[@]}" from --quiet --pull-always --signature-policy "$tmp/policy.json" "$ref") \
      || die "buildah cannot make a container of $ref"
    rc=0
    "${bah[@]}" run --isolation chroot "$ctr" -- "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
    "${bah[@]}" rm "$ctr" >/dev/null
    if ((rc == 0)) && grep -Eq "$regex" "$tmp/out"; then
      return 0
    fi
    echo "check-images: attempt $attempt: $ref: '$*' exited $rc; output:" >&2
    head -n 5 "$tmp/out" "$tmp/err" >&2
  done
  die "$ref: '$*' did not print /$regex/"
}

# common NAME TAG TITLE: what skopeo sees; prints the image config.
common() {
  local name=$1 tag=$2 title=$3 ref="oci:$layout_dir/$1:$2" info
  info=$(skopeo inspect "$ref") || die "skopeo cannot read $ref"
  expect "$name os" "$(jq -r .Os <<<"$info")" linux
  expect "$name architecture" "$(jq -r .Architecture <<<"$info")" "$arch"
  expect "$name title" "$(jq -r '.Labels["org.opencontainers.image.title"]' <<<"$info")" "$title"
  expect "$name version" "$(jq -r '.Labels["org.opencontainers.image.version"]' <<<"$info")" "$version"
  ok "$name: skopeo inspect $ref ($(jq -r .Digest <<<"$info"))"
  skopeo inspect --config "$ref" | jq -c .config
}

# --- executor ---------------------------------------------------------------
tag=$version
config=$(common executor "$tag" kiln-executor)
expect "executor entrypoint" "$(jq -c .Entrypoint <<<"$config")" '["/kiln/kiln-executor"]'
expect "executor user" "$(jq -r '.User // ""' <<<"$config")" ""
expect "executor workdir" "$(jq -r .WorkingDir <<<"$config")" /workspace
jq -e '.Env | index("DOCKER_CONFIG=/kiln/.docker/")' <<<"$config" >/dev/null \
  || die "executor: DOCKER_CONFIG is not /kiln/.docker/"
# Nothing outside /kiln but nsswitch.conf and the /kaniko link: no loader,
# no libraries, no shell.
listing=$(files executor "$tag")
stray=$(grep -Ev '^(kiln|kiln/.*|etc/?|etc/nsswitch\.conf|workspace/?|kaniko)$' <<<"$listing" || true)
[[ -z "$stray" ]] || die "executor: unexpected files in the image: $stray"
grep -qx 'kiln/ssl/certs/ca-certificates.crt' <<<"$listing" || die "executor: no CA bundle"
ok "executor: only /kiln, /kaniko, /etc/nsswitch.conf and /workspace"
# link NAME TAG PATH TARGET: PATH is a symbolic link to TARGET in the layers.
link() {
  local dir=$layout_dir/$1 manifest layer seen=""
  manifest=$(jq -r --arg t "$2" \
    '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$dir/index.json")
  while read -r layer; do
    seen=$(tar -tvf "$dir/blobs/${layer/://}" | awk -v p="$3" \
      '$1 ~ /^l/ && ($6 == p || $6 == "./" p || $6 == "/" p) {print $8}' | tail -n 1)
    [[ -z "$seen" ]] || break
  done < <(jq -r '.layers[].digest' "$dir/blobs/${manifest/://}")
  expect "$1 /$3" "$seen" "$4"
}
link executor "$tag" kaniko kiln
link executor "$tag" kiln/executor kiln-executor
ok "executor: /kaniko -> kiln, /kiln/executor -> kiln-executor"
run_expect executor "$tag" '^Usage: kiln-executor' -- /kiln/kiln-executor --help
ok "executor: buildah run /kiln/kiln-executor --help"
run_expect executor "$tag" '^Usage: kiln-executor' -- /kaniko/executor --help
ok "executor: buildah run /kaniko/executor --help (Kaniko's path)"

# --- executor-debug ---------------------------------------------------------
tag=$version-debug
config=$(common executor-debug "$tag" kiln-executor-debug)
expect "executor-debug entrypoint" "$(jq -c .Entrypoint <<<"$config")" '["/kiln/kiln-executor"]'
jq -e '.Env | index("PATH=/usr/local/bin:/kiln:/busybox")' <<<"$config" >/dev/null \
  || die "executor-debug: PATH does not hold /busybox"
run_expect executor-debug "$tag" '^Usage: kiln-executor' -- /busybox/sh -c 'kiln-executor --help'
ok "executor-debug: buildah run /busybox/sh -c 'kiln-executor --help'"
# A GitLab Kaniko job's script: credentials written where Kaniko reads them
# land in the image's DOCKER_CONFIG, and /kaniko/executor runs.
run_expect executor-debug "$tag" '^same-config Usage: kiln-executor' -- /busybox/sh -c \
  'mkdir -p /kaniko/.docker && echo "{\"auths\":{}}" > /kaniko/.docker/config.json &&
   cmp -s /kaniko/.docker/config.json "${DOCKER_CONFIG%/}/config.json" &&
   printf "same-config " && /kaniko/executor --help | grep "^Usage:"'
ok "executor-debug: /kaniko/.docker/config.json is \$DOCKER_CONFIG/config.json; /kaniko/executor runs"

# --- cache-server -----------------------------------------------------------
tag=$version
config=$(common cache-server "$tag" kiln-cache-server)
expect "cache-server entrypoint" "$(jq -c .Entrypoint <<<"$config")" '["/usr/local/bin/kiln-cache-server"]'
expect "cache-server user" "$(jq -r .User <<<"$config")" 65532:65532
expect "cache-server port" "$(jq -c '.ExposedPorts | keys' <<<"$config")" '["7070/tcp"]'
expect "cache-server volume" "$(jq -c '.Volumes | keys' <<<"$config")" '["/data"]'
run_expect cache-server "$tag" '^Usage: kiln-cache-server' -- /usr/local/bin/kiln-cache-server --help
ok "cache-server: buildah run /usr/local/bin/kiln-cache-server --help (as 65532)"
run_expect cache-server "$tag" '^Usage: kiln-cache ' -- /usr/local/bin/kiln-cache --help
ok "cache-server: buildah run /usr/local/bin/kiln-cache --help (as 65532)"

echo "check-images: all images in $layout_dir are good" >&2
