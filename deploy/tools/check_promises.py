#!/usr/bin/env python3
"""What kiln's manifests promise, asserted on the rendered objects.

Called by scripts/validate-deploy.sh with the directory holding the
`kubectl kustomize` renders (named like `overlays_s3.yaml`), from the
repository root. Each check is one promise of docs/operations.md or
deploy/README.md that a schema cannot see:

- port 7070 everywhere (docs/decisions.md): containers, Services, the
  scrape annotation, the config file, the build Job, the binaries' defaults;
- images pinned (the s3 overlay's own Deployment included);
- the production overlay changes the StatefulSet's volume claim only in
  size, and docs/operations.md has the migration for that;
- the example build Job unpacks forge archives into the context root, reads
  the cache token from a mounted Secret file, and requests ephemeral
  storage;
- the ServiceMonitor and PrometheusRule carry kube-prometheus-stack's
  `release` label, and deploy/README.md documents the selector;
- the PrometheusRule names only metrics the server exports, so a rename in
  cache-server/src/telemetry.rs that forgets the alerts fails here;
- `kiln-cache token create` lines in the docs use one scope per --scope.

Writes the PrometheusRule's groups to OUT/kiln-cache.rules.yaml for
promtool. Exit status 0 if every promise holds, 1 otherwise.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml


def main() -> int:
    out = Path(sys.argv[1])
    renders = {
        p.stem: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in out.glob("*.yaml")
        if not p.stem.startswith("broken-") and p.stem != "kiln-cache.rules"
    }
    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    def one(docs, kind, name=None):
        hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
        if len(hits) != 1:
            raise SystemExit(f"check_promises: expected one {kind} {name or ''}, got {len(hits)}")
        return hits[0]

    def containers(d):
        spec = d["spec"]["template"]["spec"]
        return spec.get("initContainers", []) + spec["containers"]

    # Port 7070.
    for name, docs in renders.items():
        for d in docs:
            if d["kind"] in ("StatefulSet", "Deployment"):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    ports = [p["containerPort"] for p in c.get("ports", [])]
                    check(ports == [7070], f"{name}: {d['kind']} container {c['name']} ports {ports}, expected [7070]")
                ann = d["spec"]["template"]["metadata"].get("annotations", {})
                check(ann.get("prometheus.io/port") == "7070", f"{name}: prometheus.io/port is {ann.get('prometheus.io/port')!r}")
            if d["kind"] == "Service":
                ports = [p["port"] for p in d["spec"]["ports"]]
                check(ports == [7070], f"{name}: Service {d['metadata']['name']} ports {ports}, expected [7070]")
            if d["kind"] == "ConfigMap" and "cache-server.toml" in d.get("data", {}):
                check('listen = "0.0.0.0:7070"' in d["data"]["cache-server.toml"], f"{name}: cache-server.toml does not listen on 7070")
            if d["kind"] == "Job":
                for c in containers(d):
                    for a in c.get("args", []):
                        if a.startswith("--cache-server="):
                            check(a.endswith(":7070"), f"{name}: {a} is not port 7070")
    check("pub const DEFAULT_PORT: u16 = 7070;" in Path("cache-server/src/config/mod.rs").read_text(),
          "cache-server/src/config/mod.rs: DEFAULT_PORT is not 7070")
    check('default_value = "http://127.0.0.1:7070"' in Path("cache-server/src/cli.rs").read_text(),
          "cache-server/src/cli.rs: kiln-cache's --server default is not port 7070")

    # Pinned images, the s3 overlay's own Deployment included.
    image = one(renders["overlays_s3"], "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    check(re.fullmatch(r"kiln/cache-server:[0-9][^:@]*", image) is not None,
          f"overlays/s3: Deployment image {image!r} has no version tag")

    # Production changes the volume claim only in size (and documents how).
    def claims(name):
        cs = yaml.safe_load(yaml.safe_dump(one(renders[name], "StatefulSet")["spec"]["volumeClaimTemplates"]))
        for c in cs:
            c["spec"]["resources"]["requests"].pop("storage", None)
        return cs
    check(claims("base") == claims("overlays_production"),
          "overlays/production changes volumeClaimTemplates beyond the storage size")
    check("--cascade=orphan" in Path("docs/operations.md").read_text(),
          "docs/operations.md lacks the base-to-production migration (--cascade=orphan)")

    # The example build Job.
    job = one(renders["examples_build-job"], "Job")
    spec = job["spec"]["template"]["spec"]
    fetch = " ".join(spec["initContainers"][0]["command"])
    check("tar -xz --strip-components=1 -C /workspace" in fetch,
          f"build Job: the context is not extracted with --strip-components=1: {fetch}")
    kiln = next(c for c in spec["containers"] if c["name"] == "kiln")
    token_args = [a for a in kiln["args"] if a.startswith("--cache-token")]
    check(len(token_args) == 1 and token_args[0].startswith("--cache-token-file="),
          f"build Job: token passed as {token_args}, expected one --cache-token-file=")
    for a in token_args:
        path = a.split("=", 1)[1]
        secrets = {v["name"] for v in spec["volumes"] if "secret" in v}
        mounts = [m for m in kiln["volumeMounts"] if m["name"] in secrets and path.startswith(m["mountPath"] + "/")]
        check(len(mounts) == 1, f"build Job: {path} is not in a mounted Secret")
    check(all(e["name"] != "KILN_CACHE_TOKEN" for e in kiln.get("env", [])), "build Job: the token is in the environment")
    for c in containers(job):
        for part in ("requests", "limits"):
            check("ephemeral-storage" in c["resources"].get(part, {}),
                  f"build Job: container {c['name']} has no ephemeral-storage {part}")

    # Prometheus Operator objects.
    full = renders["overlays_production-prometheus-operator"]
    for kind in ("ServiceMonitor", "PrometheusRule"):
        check("release" in one(full, kind)["metadata"].get("labels", {}), f"{kind} has no release label")
    check("serviceMonitorSelector" in Path("deploy/README.md").read_text(),
          "deploy/README.md does not document the ServiceMonitor selector")
    # The server's metrics, and the storage engine's (kiln-storage names
    # those it records itself, such as evictions).
    metric_sources = ("cache-server/src/telemetry.rs", "storage/src/metrics.rs")
    exported = set()
    for source in metric_sources:
        exported |= set(re.findall(r'"(kiln_cache_[a-z_]+)"', Path(source).read_text()))
    rule = one(full, "PrometheusRule")
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            for m in re.findall(r"(?<![:\w])(kiln_cache_[a-z_]+)(?![:\w])", str(r["expr"])):
                check(m in exported or re.sub(r"_(bucket|count|sum)$", "", m) in exported,
                      f"PrometheusRule {r.get('record') or r.get('alert')}: {m} is not a metric of {' or '.join(metric_sources)}")
    (out / "kiln-cache.rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))

    # `kiln-cache token create` as written in comments and docs.
    for f in (Path("deploy/kubernetes/base/tokens.toml"), Path("docs/operations.md"), Path("docs/cache-server.md")):
        for line in f.read_text().splitlines():
            if "kiln-cache token create" in line:
                for v in re.findall(r"--scope[ =](\S+)", line):
                    check(v in ("read", "write", "admin"), f"{f}: '--scope {v}' is not one scope: {line.strip()}")

    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"validate-deploy: manifest promises hold across {len(renders)} renders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
