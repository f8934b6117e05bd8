#!/usr/bin/env bash
# Fails when two cargo invocations that CI and README run would compile a
# dependency with different features (so twice): `cargo build --workspace
# --bins` and `cargo build -p kiln-executor` must ask for no dependency
# features that `cargo test --workspace` does not. The fix for a failure is
# to add the missing features to workspace-hack/Cargo.toml (docs/decisions.md,
# "One feature set per dependency"). Resolves only: compiles nothing.
# Uses cargo's unit graph, which stable cargo prints with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d "${TMPDIR:-/tmp}/kiln-features.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
graph() { # NAME CARGO-ARGS...
  local name=$1; shift
  RUSTC_BOOTSTRAP=1 cargo "$@" --release --locked -Z unstable-options --unit-graph \
    >"$scratch/$name.json"
}
graph test test --workspace --no-run
graph bins build --workspace --bins
graph executor build -p kiln-executor
python3 - "$scratch" <<'PY'
import json, sys
def units(path):
    seen = {}
    for u in json.load(open(path))["units"]:
        key = (u["pkg_id"], u["target"]["name"], u["mode"], u.get("platform"))
        seen.setdefault(key, set()).add(tuple(u["features"]))
    return seen
scratch = sys.argv[1]
tests = units(f"{scratch}/test.json")
bad = 0
for name, args in (("bins", "cargo build --workspace --bins"), ("executor", "cargo build -p kiln-executor")):
    for key, features in units(f"{scratch}/{name}.json").items():
        if key in tests and not features <= tests[key]:
            bad += 1
            print(f"check-feature-sets: {args} builds {key[0]} ({key[1]}) with {sorted(features)}, "
                  f"cargo test with {sorted(tests[key])}", file=sys.stderr)
if bad:
    print(f"check-feature-sets: {bad} units would compile twice; "
          "add the features to workspace-hack/Cargo.toml", file=sys.stderr)
    sys.exit(1)
print("check-feature-sets: one feature set per dependency")
PY
