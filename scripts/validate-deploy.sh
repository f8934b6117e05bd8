#!/usr/bin/env bash
# Validates everything under deploy/, offline:
#   1. renders every kustomization (kubectl's built-in kustomize, v5),
#   2. validates every rendered object against the Kubernetes JSON schemas
#      shipped in the kubernetes-validate wheel (strict: unknown fields are
#      errors), for the oldest and newest Kubernetes versions we support,
#      custom resources against a schema of their own, plus cross-references
#      (deploy/tools/validate_manifests.py),
#   3. asserts what the manifests promise on the rendered objects
#      (deploy/tools/check_promises.py: port 7070, pinned images, the build
#      Job's archive extraction, token file and ephemeral storage, the
#      `release` label, claim templates production shares with base), runs
#      the `kiln-cache token create` line of tokens.toml when the CLI is
#      built, and checks the PrometheusRule's groups with promtool (syntax
#      and the unit tests beside it);
#   4. checks that deliberately broken copies are rejected (so this check
#      cannot silently pass),
#   5. shellchecks the deploy scripts, lints the two Dockerfiles, parses the
#      CI snippets, and dry-runs deploy/build-images.sh's context preparation
#      with a stub builder.
# Installs its own tools (idempotent). Exits non-zero on any problem.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned tool versions (docs/decisions.md, "Validating the manifests").
KUBERNETES_VALIDATE_VERSION=1.37.0
K8S_VERSIONS=(1.29.0 1.37.0)
KUSTOMIZE_MAJOR_MIN=5

say() { echo "validate-deploy: $*"; }
fail() { echo "validate-deploy: FAIL: $*" >&2; exit 1; }

# --- tools --------------------------------------------------------------------
installed_version() { python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
if [[ "$(installed_version kubernetes-validate)" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
  say "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
apt_missing=()
command -v shellcheck >/dev/null || apt_missing+=(shellcheck)
command -v busybox >/dev/null || apt_missing+=(busybox-static)
command -v readelf >/dev/null || apt_missing+=(binutils)
if ((${#apt_missing[@]})); then
  say "installing ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
# kubectl (with kustomize v5 built in) comes with the machine image
# (docs/decisions.md); Debian's kubernetes-client is 1.20, whose kustomize
# v2 knows neither `components` nor `labels`, so it is no substitute.
command -v kubectl >/dev/null || fail "kubectl not found: it provides the kustomize renderer"
kustomize_version=$(kubectl version --client -o json 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin).get("kustomizeVersion",""))')
if ! [[ "$kustomize_version" =~ ^v([0-9]+)\. ]] || ((BASH_REMATCH[1] < KUSTOMIZE_MAJOR_MIN)); then
  fail "kubectl's kustomize is '${kustomize_version:-none}', need v$KUSTOMIZE_MAJOR_MIN or later"
fi
promtool=$(scripts/install-promtool.sh)
say "tools: kubernetes-validate $(installed_version kubernetes-validate)," \
  "$("$promtool" --version 2>&1 | head -1 | cut -d' ' -f1-3)," \
  "kustomize $kustomize_version (kubectl), $(shellcheck --version | sed -n 's/^version: /shellcheck /p')"

out=$(mktemp -d "${TMPDIR:-/tmp}/kiln-validate-deploy.XXXXXX")
trap 'rm -rf "$out"' EXIT
validator=(python3 deploy/tools/validate_manifests.py)
for v in "${K8S_VERSIONS[@]}"; do validator+=(--k8s-version "$v"); done

# --- 1. render -----------------------------------------------------------------
rendered=()
while IFS= read -r k; do
  dir=$(dirname "$k")
  # Components are not buildable alone; they are rendered through an overlay.
  grep -q '^kind: Component' "$k" && continue
  name=${dir#deploy/kubernetes/}
  file="$out/${name//\//_}.yaml"
  kubectl kustomize "$dir" >"$file" || fail "kustomize cannot render $dir"
  rendered+=("$file")
done < <(find deploy/kubernetes -name kustomization.yaml | sort)
((${#rendered[@]} >= 5)) || fail "expected at least 5 kustomizations, rendered ${#rendered[@]}"
# Every component must be used by some overlay, so that it gets validated.
while IFS= read -r c; do
  cname=$(basename "$(dirname "$c")")
  grep -rqs --include=kustomization.yaml "components/$cname" deploy/kubernetes/overlays \
    || fail "component $cname is used by no overlay, so it is never validated"
done < <(grep -l '^kind: Component' -r deploy/kubernetes --include=kustomization.yaml)
say "rendered ${#rendered[@]} kustomizations"
# The object-storage overlay trades the StatefulSet for a Deployment of
# replicas with a PodDisruptionBudget (docs/object-storage.md).
s3_overlay="$out/overlays_s3.yaml"
[[ -s "$s3_overlay" ]] || fail "overlays/s3 was not rendered"
for kind in Deployment PodDisruptionBudget Secret; do
  grep -q "^kind: $kind\$" "$s3_overlay" || fail "overlays/s3 renders no $kind"
done
if grep -q '^kind: StatefulSet$' "$s3_overlay"; then
  fail "overlays/s3 still renders the StatefulSet"
fi

# --- 2. validate ---------------------------------------------------------------
"${validator[@]}" "${rendered[@]}" || fail "invalid manifests (above)"
say "all rendered objects valid against Kubernetes ${K8S_VERSIONS[*]}"

# --- 3. promises, on the rendered objects ---------------------------------------
python3 deploy/tools/check_promises.py "$out" || fail "manifest promises (above)"
# The tokens.toml comment's `kiln-cache token create` line runs, when the
# admin CLI is built (check_promises.py checks its syntax regardless).
kiln_cache="${CARGO_TARGET_DIR:-target}/release/kiln-cache"
if [[ -x "$kiln_cache" ]]; then
  create=$(sed -n 's/^#   kiln-cache token create //p' deploy/kubernetes/base/tokens.toml)
  [[ -n "$create" ]] || fail "tokens.toml shows no 'kiln-cache token create' line"
  # shellcheck disable=SC2086 # the line's words are the arguments
  "$kiln_cache" token create $create >/dev/null \
    || fail "tokens.toml: 'kiln-cache token create $create' fails"
  say "tokens.toml's 'kiln-cache token create $create' runs"
fi
cp deploy/kubernetes/components/prometheus-operator/prometheusrule.test.yaml "$out/"
"$promtool" check rules "$out/kiln-cache.rules.yaml" >"$out/rules.log" 2>&1 \
  || { cat "$out/rules.log" >&2; fail "promtool check rules"; }
(cd "$out" && "$promtool" test rules prometheusrule.test.yaml) >"$out/rules-test.log" 2>&1 \
  || { cat "$out/rules-test.log" >&2; fail "promtool test rules"; }
say "PrometheusRule: $(grep -o '[0-9]* rules found' "$out/rules.log"), unit tests pass"

# --- 4. negative self-check ----------------------------------------------------
# The overlay with the most kinds (it includes the ServiceMonitor) is broken in
# several ways, one at a time; each copy must be rejected.
full="$out/overlays_production-prometheus-operator.yaml"
[[ -s "$full" ]] || fail "missing $full for the negative self-check"
while IFS= read -r m; do
  "${validator[@]}" --mutate "$m" "$full" "$out/broken-$m.yaml"
  if "${validator[@]}" "$out/broken-$m.yaml" >"$out/broken-$m.log" 2>&1; then
    fail "negative self-check: the '$m' breakage was NOT detected"
  fi
  say "negative self-check: '$m' rejected: $(grep -m1 -v ' objects (' "$out/broken-$m.log" | cut -c1-160)"
done < <("${validator[@]}" --list-mutations)

# --- 5. scripts, Dockerfiles, CI snippets --------------------------------------
shellcheck deploy/build-images.sh scripts/validate-deploy.sh scripts/install-promtool.sh \
  scripts/prereqs.sh || fail "shellcheck"
say "shellcheck clean"

# dockerfile_has FILE REGEX: the (continuation-joined) Dockerfile has a line
# matching REGEX. A lint of what the images promise, not a Dockerfile parser.
dockerfile_has() {
  sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$1" | grep -Eq "$2" || fail "$1: no line matching /$2/"
}
for f in deploy/executor/Dockerfile deploy/cache-server/Dockerfile; do
  dockerfile_has "$f" '^FROM scratch'
  dockerfile_has "$f" '^ENTRYPOINT \["/'
  for l in title description version revision licenses; do
    dockerfile_has "$f" "org\.opencontainers\.image\.$l="
  done
done
dockerfile_has deploy/executor/Dockerfile '^ENV .*DOCKER_CONFIG=/kiln/\.docker/'
dockerfile_has deploy/executor/Dockerfile '^ENV .*SSL_CERT_FILE=/kiln/ssl/certs/ca-certificates\.crt'
dockerfile_has deploy/executor/Dockerfile '^FROM executor AS debug'
dockerfile_has deploy/cache-server/Dockerfile '^USER 65532:65532$'
dockerfile_has deploy/cache-server/Dockerfile '^EXPOSE 7070$'
dockerfile_has deploy/cache-server/Dockerfile '^VOLUME /data$'
say "Dockerfiles lint clean"

python3 - deploy/ci/gitlab-ci.yml deploy/ci/github-actions.yml <<'EOF' || fail "CI snippets"
import sys, yaml
gitlab, github = (yaml.safe_load(open(p)) for p in sys.argv[1:])
jobs = {k: v for k, v in gitlab.items() if isinstance(v, dict) and "script" in v}
assert jobs, "gitlab-ci.yml: no job with a script"
for name, job in jobs.items():
    assert "kiln-executor" in " ".join(job["script"]), f"gitlab job {name} does not run kiln-executor"
assert github.get("jobs"), "github-actions.yml: no jobs"
assert True in github or "on" in github, "github-actions.yml: no trigger ('on')"
for name, job in github["jobs"].items():
    assert "runs-on" in job and job.get("steps"), f"github job {name}: runs-on and steps needed"
    assert any("kiln" in str(s.get("run", "")) for s in job["steps"]), f"github job {name} does not run kiln"
print("validate-deploy: CI snippets parse:", ", ".join(jobs), "|", ", ".join(github["jobs"]))
EOF

# build-images.sh up to the point where kiln-executor takes over: a stub
# builder records the contexts it was given.
stub="$out/stub"
mkdir -p "$stub"
install -m 0755 "$(command -v busybox)" "$stub/kiln-executor"   # any static ELF
for b in kiln-cache-server kiln-cache; do install -m 0755 /bin/true "$stub/$b"; done  # dynamic
cat >"$stub/builder" <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
ctx=""
while (($#)); do
  case "$1" in
    --context) ctx=$2; shift 2 ;;
    --digest-file) echo "sha256:$(printf '0%.0s' {1..64})" >"$2"; shift 2 ;;
    *) shift ;;
  esac
done
(cd "$ctx" && find . -path ./busybox -prune -o -print | sort) >>"$STUB_LOG"
EOF
chmod +x "$stub/builder"
STUB_LOG="$out/stub.log" deploy/build-images.sh --registry registry.invalid/kiln \
  --bin-dir "$stub" --builder "$stub/builder" >"$out/build-images.log" 2>&1 \
  || { cat "$out/build-images.log" >&2; fail "build-images.sh (stub builder)"; }
for p in ./kiln/kiln-executor ./kiln/.docker ./kiln/ssl/certs/ca-certificates.crt \
  ./rootfs/usr/local/bin/kiln-cache-server ./rootfs/usr/local/bin/kiln-cache \
  ./rootfs/etc/passwd ./rootfs/etc/group ./rootfs/etc/ssl/certs/ca-certificates.crt ./data; do
  grep -qxF "$p" "$out/stub.log" || fail "build-images.sh context lacks $p"
done
[[ $(grep -c '^== ' "$out/build-images.log") == 3 ]] || fail "build-images.sh did not run 3 builds"
# ... and refuses a dynamically linked executor (it could not run from /kiln).
install -m 0755 /bin/true "$stub/kiln-executor"
if STUB_LOG="$out/stub.log" deploy/build-images.sh --registry registry.invalid/kiln \
  --bin-dir "$stub" --builder "$stub/builder" >"$out/build-images.log" 2>&1; then
  fail "build-images.sh accepted a dynamically linked kiln-executor"
fi
say "build-images.sh prepares both contexts (stub builder, 3 builds), refuses a dynamic executor"

say "OK"
