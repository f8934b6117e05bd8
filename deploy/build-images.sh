#!/usr/bin/env bash
# Builds kiln's own images with kiln: no Docker daemon, no base image.
#
#   deploy/build-images.sh --oci-layout DIR   [options]   # DIR/<image>/ layouts
#   deploy/build-images.sh --registry HOST/REPO [options] # push HOST/REPO/<image>:VERSION
#
# Images: executor, executor-debug (with busybox, for CI systems that need a
# shell in the job image) and cache-server. Every build is --reproducible.
#
# The binaries are built beforehand (this script never compiles). The
# executor must be statically linked: with `--isolation none` it unpacks the
# image being built over /, so it may not depend on anything outside /kiln.
# The cache server may be dynamic; its shared libraries are then copied into
# its image at their host paths. See docs/decisions.md ("Images of kiln").
#
# Options:
#   --oci-layout DIR     write one OCI image layout per image under DIR
#   --registry HOST/REPO push to HOST/REPO/executor:VERSION, ...:VERSION-debug
#                        and HOST/REPO/cache-server:VERSION
#   --bin-dir DIR        where kiln-executor, kiln-cache-server and kiln-cache
#                        are (default: $CARGO_TARGET_DIR/release, else
#                        target/release)
#   --builder FILE       the kiln-executor that runs the builds (default: the
#                        one in --bin-dir)
#   --version V          image version (default: the workspace version)
#   --keep-context       keep the prepared build contexts and print where
#   -h, --help           this text
# Anything after `--` is passed to every kiln-executor invocation (for
# example `-- --insecure-registry localhost:5000`).
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "build-images: $*" >&2; exit 1; }

repo_root=$(cd "$(dirname "$0")/.." && pwd)
oci_layout=""
registry=""
bin_dir="${CARGO_TARGET_DIR:-$repo_root/target}/release"
builder=""
version=""
keep_context=false
extra=()

while (($#)); do
  case "$1" in
    --oci-layout) oci_layout=${2:?--oci-layout needs a directory}; shift 2 ;;
    --registry) registry=${2:?--registry needs HOST/REPO}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --builder) builder=${2:?--builder needs a file}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --keep-context) keep_context=true; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

if [[ -n "$oci_layout" && -n "$registry" ]] || [[ -z "$oci_layout" && -z "$registry" ]]; then
  die "give exactly one of --oci-layout DIR or --registry HOST/REPO"
fi
[[ -n "$builder" ]] || builder="$bin_dir/kiln-executor"
[[ -x "$builder" ]] || die "no kiln-executor to build with at $builder (use --builder)"
for b in kiln-executor kiln-cache-server kiln-cache; do
  [[ -x "$bin_dir/$b" ]] || die "missing $bin_dir/$b: build the release binaries first"
done
if [[ -z "$version" ]]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' "$repo_root/Cargo.toml")
  [[ -n "$version" ]] || die "cannot read the workspace version from Cargo.toml; use --version"
fi
revision=$(git -C "$repo_root" rev-parse HEAD 2>/dev/null || echo unknown)
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[[ -s "$ca_bundle" ]] || die "no CA bundle at $ca_bundle (apt-get install ca-certificates)"

is_dynamic() { readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; }

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-images.XXXXXX")
cleanup() {
  if $keep_context; then echo "build contexts kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- executor context -------------------------------------------------------
exe_ctx="$work/executor"
if is_dynamic "$bin_dir/kiln-executor"; then
  die "$bin_dir/kiln-executor is dynamically linked; the executor image needs a static binary
  (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p kiln-executor,
  then --bin-dir target/x86_64-unknown-linux-gnu/release)"
fi
install -d "$exe_ctx/kiln/.docker" "$exe_ctx/kiln/ssl/certs" "$exe_ctx/etc" "$exe_ctx/busybox"
install -m 0755 "$bin_dir/kiln-executor" "$exe_ctx/kiln/kiln-executor"
install -m 0644 "$ca_bundle" "$exe_ctx/kiln/ssl/certs/ca-certificates.crt"
printf 'hosts: files dns\n' >"$exe_ctx/etc/nsswitch.conf"
busybox_bin=$(command -v busybox || true)
[[ -n "$busybox_bin" ]] || die "busybox not found (apt-get install busybox-static)"
is_dynamic "$busybox_bin" && die "$busybox_bin is dynamic; install busybox-static"
install -m 0755 "$busybox_bin" "$exe_ctx/busybox/busybox"
while read -r applet; do
  [[ "$applet" == busybox ]] || ln -s busybox "$exe_ctx/busybox/$applet"
done < <("$busybox_bin" --list)

# --- cache server context ---------------------------------------------------
srv_ctx="$work/cache-server"
install -d "$srv_ctx/rootfs/usr/local/bin" "$srv_ctx/rootfs/etc/ssl/certs" "$srv_ctx/data"
for b in kiln-cache-server kiln-cache; do
  install -m 0755 "$bin_dir/$b" "$srv_ctx/rootfs/usr/local/bin/$b"
  if is_dynamic "$bin_dir/$b"; then
    # Copy the loader and every library ldd resolves, at their host paths.
    while read -r lib; do
      [[ -n "$lib" ]] || continue
      install -D -m 0755 "$(readlink -f "$lib")" "$srv_ctx/rootfs$lib"
    done < <(ldd "$bin_dir/$b" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' | sort -u)
  fi
done
install -m 0644 "$ca_bundle" "$srv_ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nkiln:x:65532:65532:kiln cache server:/data:/sbin/nologin\n' \
  >"$srv_ctx/rootfs/etc/passwd"
printf 'root:x:0:\nkiln:x:65532:\n' >"$srv_ctx/rootfs/etc/group"
printf 'hosts: files dns\n' >"$srv_ctx/rootfs/etc/nsswitch.conf"

# --- builds -----------------------------------------------------------------
# build NAME CONTEXT DOCKERFILE [TARGET]
build() {
  local name=$1 ctx=$2 dockerfile=$3 target=${4:-}
  local args=(--context "$ctx" --dockerfile "$dockerfile" --reproducible
    --build-arg "KILN_VERSION=$version" --build-arg "KILN_REVISION=$revision"
    --digest-file "$work/$name.digest")
  [[ -z "$target" ]] || args+=(--target "$target")
  local tag=$version
  [[ "$name" != executor-debug ]] || tag="$version-debug"
  if [[ -n "$oci_layout" ]]; then
    args+=(--no-push --oci-layout-path "$oci_layout/$name")
  else
    local repo_name=${name%-debug}
    args+=(--destination "$registry/$repo_name:$tag")
  fi
  echo "== $name" >&2
  "$builder" "${args[@]}" "${extra[@]}"
  if [[ -n "$oci_layout" ]]; then
    # An independent reader must accept what we wrote.
    skopeo inspect "oci:$oci_layout/$name" >"$work/$name.inspect.json" \
      || die "skopeo cannot read the OCI layout $oci_layout/$name"
    echo "   layout $oci_layout/$name" >&2
  fi
  echo "   digest $(cat "$work/$name.digest")" >&2
}

if [[ -n "$oci_layout" ]]; then
  command -v skopeo >/dev/null || die "skopeo is needed to check the layouts (apt-get install skopeo)"
  mkdir -p "$oci_layout"
fi
build executor "$exe_ctx" "$repo_root/deploy/executor/Dockerfile" executor
build executor-debug "$exe_ctx" "$repo_root/deploy/executor/Dockerfile" debug
build cache-server "$srv_ctx" "$repo_root/deploy/cache-server/Dockerfile"
