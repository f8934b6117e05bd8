#!/usr/bin/env bash
# Builds kiln's own images with kiln: no Docker daemon, no Buildah, no base
# image.
#
#   deploy/build-images.sh --oci-layout DIR   [options]   # DIR/<image>/ layouts
#   deploy/build-images.sh --registry HOST/REPO [options] # push HOST/REPO/<image>:VERSION
#
# Images: executor, executor-debug (with busybox, for CI systems that need a
# shell in the job image) and cache-server. Every build is --reproducible:
# the same sources and binaries give the same digests, so running the script
# again is harmless. With --oci-layout each image gets its own layout,
# DIR/executor, DIR/executor-debug and DIR/cache-server, tagged VERSION
# (VERSION-debug for the debug image), replaced as a whole on every run;
# `skopeo inspect oci:DIR/executor:VERSION` must accept each one.
#
# Binaries (built here with cargo first, unless --no-build; cargo does
# nothing when they are up to date):
#   - the builder and the cache server: the normal release build,
#     `cargo build --release --workspace --locked --bins` in
#     $CARGO_TARGET_DIR (default: target/);
#   - the executor inside the image: static glibc, without the embedded cache
#     (RocksDB), built on the main build's dependencies: only its own crate
#     (--no-default-features) and kiln-storage (without the index) are
#     compiled again, and `+crt-static` is given to the final link alone
#     (`cargo rustc ... -- -C target-feature=+crt-static`; on glibc targets
#     it changes nothing in the dependencies' code). cargo puts that binary
#     where the main build's executor is; it is copied to
#     $CARGO_TARGET_DIR/static/kiln-executor and the main build's is put
#     back (a `cargo build` of fresh units only relinks it).
# The image's executor must have no ELF interpreter: with `--isolation none`
# it unpacks the image being built over /. The cache server may be dynamic;
# its loader and libraries (from ldd) are copied into its image at their host
# paths. See docs/decisions.md ("Images of kiln").
#
# Options:
#   --oci-layout DIR     write one OCI image layout per image under DIR
#   --registry HOST/REPO push to HOST/REPO/executor:VERSION, ...:VERSION-debug
#                        and HOST/REPO/cache-server:VERSION
#   --check              after --oci-layout, run deploy/check-images.sh on DIR
#   --no-build           do not run cargo; use the binaries already built
#   --build-only         only run cargo (and check the static executor), build
#                        no image (.ci/run times the compile on its own)
#   --bin-dir DIR        take kiln-executor (static, for the image),
#                        kiln-cache-server and kiln-cache from DIR instead
#                        (implies --no-build)
#   --builder FILE       the kiln-executor that runs the builds (default: the
#                        one of the main release build, or of --bin-dir)
#   --version V          image version (default: the workspace version)
#   --keep-context       keep the prepared build contexts and print where
#   -h, --help           this text
# Anything after `--` is passed to every kiln-executor invocation (for
# example `-- --insecure-registry localhost:5000`).
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "build-images: $*" >&2; exit 1; }
say() { echo "build-images: $*" >&2; }

repo_root=$(cd "$(dirname "$0")/.." && pwd)
oci_layout=""
registry=""
version=""
check=false
build=true
build_only=false
keep_context=false
bin_dir=""
builder=""
extra=()

while (($#)); do
  case "$1" in
    --oci-layout) oci_layout=${2:?--oci-layout needs a directory}; shift 2 ;;
    --registry) registry=${2:?--registry needs HOST/REPO}; shift 2 ;;
    --check) check=true; shift ;;
    --no-build) build=false; shift ;;
    --build-only) build_only=true; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; build=false; shift 2 ;;
    --builder) builder=${2:?--builder needs a file}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --keep-context) keep_context=true; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

if $build_only; then
  if [[ -n "$oci_layout$registry$bin_dir" ]] || ! $build || $check; then
    die "--build-only takes no --oci-layout, --registry, --check, --no-build or --bin-dir"
  fi
elif [[ -n "$oci_layout" && -n "$registry" ]] || [[ -z "$oci_layout" && -z "$registry" ]]; then
  die "give exactly one of --oci-layout DIR or --registry HOST/REPO"
fi
if $check && [[ -z "$oci_layout" ]]; then
  die "--check needs --oci-layout (check a registry's images with skopeo/buildah yourself)"
fi
if [[ -z "$version" ]]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' "$repo_root/Cargo.toml")
  [[ -n "$version" ]] || die "cannot read the workspace version from Cargo.toml; use --version"
fi
revision=$(git -C "$repo_root" rev-parse HEAD 2>/dev/null || echo unknown)
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[[ -s "$ca_bundle" ]] || die "no CA bundle at $ca_bundle (apt-get install ca-certificates)"
for tool in readelf strip ldd; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install binutils libc-bin)"
done
busybox_bin=$(command -v busybox || true)
[[ -n "$busybox_bin" ]] || die "busybox not found (scripts/prereqs.sh installs busybox-static)"
if [[ -n "$oci_layout" ]]; then
  command -v skopeo >/dev/null || die "skopeo is needed to check the layouts (scripts/prereqs.sh)"
fi

# --- binaries ---------------------------------------------------------------
main_target=${CARGO_TARGET_DIR:-$repo_root/target}
main_target=${main_target%/}
if [[ -n "$bin_dir" ]]; then
  static_exe="$bin_dir/kiln-executor"
  server_dir=$bin_dir
else
  static_exe="$main_target/static/kiln-executor"
  server_dir=$main_target/release
fi
[[ -n "$builder" ]] || builder="$server_dir/kiln-executor"

if $build; then
  command -v cargo >/dev/null || die "cargo not found (install Rust, see README.md)"
  say "cargo build: builder and cache server in $main_target"
  (cd "$repo_root" && CARGO_TARGET_DIR="$main_target" \
    cargo build --release --workspace --locked --bins)
  say "cargo build: static executor into $main_target/static"
  # The same environment as the main build (.ci/run's clippy wrapper
  # included), so that every dependency is the main build's unit; the
  # wrapper then lints the image's configuration too.
  (cd "$repo_root" && CARGO_TARGET_DIR="$main_target" \
    cargo rustc --release --locked -p kiln-executor --no-default-features \
      --bin kiln-executor -- -C target-feature=+crt-static)
  install -d "$main_target/static"
  cp -f "$main_target/release/kiln-executor" "$static_exe.tmp"
  mv -f "$static_exe.tmp" "$static_exe"
  (cd "$repo_root" && CARGO_TARGET_DIR="$main_target" \
    cargo build --release --workspace --locked --bins)
fi
for b in "$builder" "$static_exe" "$server_dir/kiln-cache-server" "$server_dir/kiln-cache"; do
  [[ -x "$b" ]] || die "missing $b (run without --no-build to build it)"
done

# (grep reads all of readelf's output: with -q, an early exit could kill
# readelf with SIGPIPE and pipefail would turn a match into a miss.)
has_interp() { readelf -lW "$1" 2>/dev/null | grep 'Requesting program interpreter' >/dev/null; }
needs_libs() { readelf -dW "$1" 2>/dev/null | grep '(NEEDED)' >/dev/null; }
# put_binary SRC DEST: a copy without debug information (the release profile
# keeps line tables: 400 MB instead of 20); symbols stay, for backtraces.
put_binary() {
  install -d "$(dirname "$2")"
  strip --strip-debug -o "$2" "$1"
  chmod 0755 "$2"
}

readelf -h "$static_exe" >/dev/null 2>&1 || die "$static_exe is not an ELF executable"
if has_interp "$static_exe" || needs_libs "$static_exe"; then
  die "$static_exe is dynamically linked; the executor image needs a static binary"
fi
# The one cargo built must run (check-images.sh runs it inside the image
# too); --bin-dir's are taken as they are.
if [[ -z "$bin_dir" ]]; then
  help=$("$static_exe" --help 2>&1) || die "$static_exe --help fails: $help"
  grep -q '^Usage: kiln-executor' <<<"$help" || die "$static_exe --help does not print its usage"
fi
if $build_only; then
  say "binaries built; no images (--build-only)"
  exit 0
fi
if has_interp "$busybox_bin" || needs_libs "$busybox_bin"; then
  die "$busybox_bin is dynamic; install busybox-static"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-images.XXXXXX")
partial=""
cleanup() {
  [[ -z "$partial" ]] || rm -rf "$partial"
  if $keep_context; then echo "build contexts kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- executor context -------------------------------------------------------
exe_ctx="$work/executor"
install -d "$exe_ctx/kiln/.docker" "$exe_ctx/kiln/ssl/certs" "$exe_ctx/etc" "$exe_ctx/busybox"
put_binary "$static_exe" "$exe_ctx/kiln/kiln-executor"
# Kaniko's paths: /kaniko/executor, /kaniko/.docker, /kaniko/ssl (Dockerfile).
ln -s kiln-executor "$exe_ctx/kiln/executor"
install -d "$exe_ctx/links"
ln -s kiln "$exe_ctx/links/kaniko"
install -m 0644 "$ca_bundle" "$exe_ctx/kiln/ssl/certs/ca-certificates.crt"
printf 'hosts: files dns\n' >"$exe_ctx/etc/nsswitch.conf"
install -m 0755 "$busybox_bin" "$exe_ctx/busybox/busybox"
while read -r applet; do
  [[ "$applet" == busybox ]] || ln -s busybox "$exe_ctx/busybox/$applet"
done < <("$busybox_bin" --list)

# --- cache server context ---------------------------------------------------
srv_ctx="$work/cache-server"
install -d "$srv_ctx/rootfs/usr/local/bin" "$srv_ctx/rootfs/etc/ssl/certs" "$srv_ctx/data"
for b in kiln-cache-server kiln-cache; do
  put_binary "$server_dir/$b" "$srv_ctx/rootfs/usr/local/bin/$b"
  if has_interp "$server_dir/$b"; then
    # Copy the loader and every library ldd resolves, at their host paths.
    while read -r lib; do
      [[ -n "$lib" ]] || continue
      install -D -m 0755 "$(readlink -f "$lib")" "$srv_ctx/rootfs$lib"
    done < <(ldd "$server_dir/$b" \
      | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' | sort -u)
  fi
done
install -m 0644 "$ca_bundle" "$srv_ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nkiln:x:65532:65532:kiln cache server:/data:/sbin/nologin\n' \
  >"$srv_ctx/rootfs/etc/passwd"
printf 'root:x:0:\nkiln:x:65532:\n' >"$srv_ctx/rootfs/etc/group"
printf 'hosts: files dns\n' >"$srv_ctx/rootfs/etc/nsswitch.conf"

# The builder's own state (layer store, embedded cache) lives in $work: the
# builds only COPY, so a cold cache costs seconds, and nothing is left in
# ~/.cache/kiln.
state="$work/state"

# --- builds -----------------------------------------------------------------
# build NAME CONTEXT DOCKERFILE [TARGET]
build() {
  local name=$1 ctx=$2 dockerfile=$3 target=${4:-}
  local repo_name=${name%-debug} tag=$version
  [[ "$name" != executor-debug ]] || tag="$version-debug"
  local args=(--context "$ctx" --dockerfile "$dockerfile" --reproducible
    --build-arg "KILN_VERSION=$version" --build-arg "KILN_REVISION=$revision"
    --cache-dir "$state" --digest-file "$work/$name.digest")
  [[ -z "$target" ]] || args+=(--target "$target")
  local out=""
  if [[ -n "$oci_layout" ]]; then
    # Write a fresh layout beside the old one and swap them afterwards, so
    # the layout holds exactly this image and a failed run leaves the
    # previous one in place.
    out="$oci_layout/.$name.partial"
    rm -rf "$out"
    partial=$out
    args+=(--no-push --oci-layout-path "$out" --destination "kiln/$repo_name:$tag")
  else
    args+=(--destination "$registry/$repo_name:$tag")
  fi
  echo "== $name ($tag)" >&2
  "$builder" "${args[@]}" "${extra[@]}"
  local digest
  digest=$(cat "$work/$name.digest")
  if [[ -n "$oci_layout" ]]; then
    # An independent reader must accept what we wrote, with the same digest.
    local seen
    seen=$(skopeo inspect --format '{{.Digest}}' "oci:$out:$tag") \
      || die "skopeo cannot read the OCI layout $out ($tag)"
    [[ "$seen" == "$digest" ]] || die "skopeo sees $seen in $out, kiln wrote $digest"
    rm -rf "${oci_layout:?}/${name:?}"
    mv "$out" "$oci_layout/$name"
    partial=""
    echo "$name oci:$oci_layout/$name:$tag $digest"
  else
    echo "$name $registry/$repo_name:$tag $digest"
  fi
}

if [[ -n "$oci_layout" ]]; then
  mkdir -p "$oci_layout"
  oci_layout=$(cd "$oci_layout" && pwd)
fi
build executor "$exe_ctx" "$repo_root/deploy/executor/Dockerfile" executor
build executor-debug "$exe_ctx" "$repo_root/deploy/executor/Dockerfile" debug
build cache-server "$srv_ctx" "$repo_root/deploy/cache-server/Dockerfile"

if $check; then
  "$repo_root/deploy/check-images.sh" --version "$version" "$oci_layout"
fi
