#!/usr/bin/env python3
"""Offline validation of kiln's rendered Kubernetes manifests.

Called by scripts/validate-deploy.sh with the YAML files that
`kubectl kustomize` rendered. Every object is checked three ways:

1. Against the Kubernetes OpenAPI-derived JSON schemas shipped inside the
   kubernetes-validate wheel (no network), in strict mode (unknown fields are
   errors), for every Kubernetes version given with --k8s-version.
2. Custom resources, which those schemas do not cover, against the schema in
   CRD_SCHEMAS below: written from the CRD's documented fields, strict for
   the fields we use.
3. Cross-references that a schema cannot see: a Service or NetworkPolicy
   selecting no pod, a named port that no container declares, a ConfigMap or
   Secret that is mounted but neither rendered nor declared external.
4. Policies the manifests promise (docs/operations.md): every image pinned
   to a tag or digest (never `latest`), liveness and readiness probes on
   long-running containers, requests and limits on every container
   (ephemeral storage too, for Jobs: a build writes its root filesystem
   there), and secrets mounted as files, never passed in arguments.

Exit status: 0 if everything is valid, 1 if anything is not (each problem is
printed as `file: Kind/name: message`), 2 on a usage error.

`--mutate KIND FILE OUT` writes a deliberately broken copy of FILE for the
negative self-check (the caller then expects validation of OUT to fail).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

# Secrets the example build Job uses but the user creates (documented in
# deploy/kubernetes/examples/build-job/kustomization.yaml).
EXTERNAL_SECRETS = {"kiln-registry-credentials", "kiln-cache-token"}

_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}

# monitoring.coreos.com/v1 ServiceMonitor: the subset of the Prometheus
# Operator's CRD that kiln's manifests use. Strict: a field outside it is
# an error, so a typo cannot slip through; extend it when a manifest needs
# another documented field.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}

# monitoring.coreos.com/v1 PrometheusRule: the rule groups (what promtool
# checks, see scripts/validate-deploy.sh) inside the object's envelope.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                    "properties": {
                                        "record": {"type": "string"},
                                        "alert": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def load(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ident(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


def pod_templates(docs: list[dict]):
    """(owner doc, namespace, template labels, pod spec) for every workload."""
    for d in docs:
        if d.get("kind") in POD_TEMPLATE_KINDS:
            tmpl = (d.get("spec") or {}).get("template") or {}
            ns = (d.get("metadata") or {}).get("namespace")
            yield d, ns, (tmpl.get("metadata") or {}).get("labels") or {}, tmpl.get("spec") or {}
        elif d.get("kind") == "Pod":
            yield d, d["metadata"].get("namespace"), d["metadata"].get("labels") or {}, d.get("spec") or {}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def schema_errors(doc: dict, versions: list[str]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        v = jsonschema.Draft7Validator(CRD_SCHEMAS[key])
        return [
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message} (CRD subset schema)"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"no schema for {key} in Kubernetes {version}: {e}")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path)) or "<root>"
            errors.append(f"Kubernetes {version}: {path}: {e.message}")
    return errors


def reference_errors(docs: list[dict]) -> list[tuple[dict, str]]:
    out: list[tuple[dict, str]] = []
    templates = list(pod_templates(docs))
    names = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}

    def container_ports(spec: dict) -> set:
        ports = set()
        for c in spec.get("containers", []):
            for p in c.get("ports", []) or []:
                ports.add(p.get("name"))
                ports.add(p.get("containerPort"))
        return ports

    for d in docs:
        kind = d.get("kind")
        ns = (d.get("metadata") or {}).get("namespace")
        if kind == "Service":
            sel = (d.get("spec") or {}).get("selector") or {}
            hits = [t for t in templates if t[1] == ns and matches(sel, t[2])]
            if sel and not hits:
                out.append((d, f"selector {sel} matches no pod template"))
            for p in (d.get("spec") or {}).get("ports", []) or []:
                tp = p.get("targetPort", p.get("port"))
                for _, _, _, spec in hits:
                    if tp not in container_ports(spec):
                        out.append((d, f"targetPort {tp!r} is not a port of the selected pods"))
        elif kind == "NetworkPolicy":
            sel = ((d.get("spec") or {}).get("podSelector") or {}).get("matchLabels") or {}
            hits = [t for t in templates if t[1] == ns and matches(sel, t[2])]
            if not hits:
                out.append((d, f"podSelector {sel} matches no pod template"))
            for rule in (d.get("spec") or {}).get("ingress", []) or []:
                for p in rule.get("ports", []) or []:
                    for _, _, _, spec in hits:
                        if "port" in p and p["port"] not in container_ports(spec):
                            out.append((d, f"port {p['port']!r} is not a port of the selected pods"))
        elif kind == "ServiceMonitor":
            sel = ((d.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            svcs = [s for s in docs if s.get("kind") == "Service" and matches(sel, (s.get("metadata") or {}).get("labels") or {})]
            if len(svcs) != 1:
                # None: nothing scraped. Several: every pod scraped twice.
                out.append((d, f"selector {sel} matches {len(svcs)} Services, expected exactly 1"))
            for ep in d["spec"].get("endpoints", []):
                if "port" in ep and not any(ep["port"] in {p.get("name") for p in s["spec"].get("ports", [])} for s in svcs):
                    out.append((d, f"endpoint port {ep['port']!r} is not a port name of the selected Services"))

    for owner, _, labels, spec in templates:
        if owner.get("kind") in POD_TEMPLATE_KINDS and owner.get("kind") != "Job":
            sel = ((owner.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not matches(sel, labels):
                out.append((owner, f"selector {sel} does not match the template labels {labels}"))
        if owner.get("kind") == "StatefulSet":
            svc = owner["spec"].get("serviceName")
            if svc and ("Service", svc) not in names:
                out.append((owner, f"serviceName {svc!r} is not a rendered Service"))
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", sa) not in names:
            out.append((owner, f"serviceAccountName {sa!r} is not a rendered ServiceAccount"))
        volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
        claim_names = {c["metadata"]["name"] for c in (owner.get("spec") or {}).get("volumeClaimTemplates", []) or []}
        for v in volumes.values():
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                out.append((owner, f"volume {v['name']!r}: ConfigMap {v['configMap']['name']!r} is not rendered"))
            if "secret" in v:
                s = v["secret"]["secretName"]
                if ("Secret", s) not in names and s not in EXTERNAL_SECRETS:
                    out.append((owner, f"volume {v['name']!r}: Secret {s!r} is neither rendered nor a documented external Secret"))
        for c in (spec.get("initContainers", []) or []) + (spec.get("containers", []) or []):
            cname = c.get("name")
            res = c.get("resources") or {}
            if not res.get("requests") or not res.get("limits"):
                out.append((owner, f"container {cname!r} needs resource requests and limits"))
            if not c.get("securityContext"):
                out.append((owner, f"container {cname!r} needs a securityContext"))
            for m in c.get("volumeMounts", []) or []:
                if m["name"] not in volumes and m["name"] not in claim_names:
                    out.append((owner, f"container {cname!r} mounts unknown volume {m['name']!r}"))
            for e in c.get("env", []) or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ("Secret", ref["name"]) not in names and ref["name"] not in EXTERNAL_SECRETS:
                    out.append((owner, f"env {e['name']!r}: Secret {ref['name']!r} is neither rendered nor external"))
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if port is not None and port not in container_ports({"containers": [c]}):
                    out.append((owner, f"container {cname!r}: {probe} port {port!r} is not declared"))
    return out


LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# Argument names that carry a secret value (a file flag, `--x-token-file`,
# names where the secret is instead).
_SECRET_WORDS = ("token", "password", "secret", "credential")


def image_pinned(image: str) -> bool:
    """A tag other than `latest`, or a digest, on the last path component."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def policy_errors(docs: list[dict]) -> list[tuple[dict, str]]:
    out: list[tuple[dict, str]] = []
    for owner, _, _, spec in pod_templates(docs):
        kind = owner.get("kind")
        for c in (spec.get("initContainers", []) or []) + (spec.get("containers", []) or []):
            cname = c.get("name")
            image = c.get("image", "")
            if not image_pinned(image):
                out.append((owner, f"container {cname!r}: image {image!r} is not pinned to a tag or digest"))
            if kind in LONG_RUNNING_KINDS and c in (spec.get("containers") or []):
                for probe in ("livenessProbe", "readinessProbe"):
                    if not c.get(probe):
                        out.append((owner, f"container {cname!r} has no {probe}"))
            if kind == "Job":
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    if "ephemeral-storage" not in (res.get(part) or {}):
                        out.append((owner, f"container {cname!r}: no ephemeral-storage in resources.{part}"))
            secret_env = {
                e["name"] for e in c.get("env", []) or [] if (e.get("valueFrom") or {}).get("secretKeyRef")
            }
            for arg in (c.get("command") or []) + (c.get("args") or []):
                arg = str(arg)
                for var in secret_env:
                    if f"$({var})" in arg:
                        out.append((owner, f"container {cname!r}: argument {arg!r} passes the Secret-backed ${var}: mount the Secret and pass its file"))
                name = arg.split("=", 1)[0]
                if name.startswith("--") and any(w in name for w in _SECRET_WORDS) and not name.endswith("-file") and "=" in arg:
                    out.append((owner, f"container {cname!r}: argument {name} carries a secret on the command line: use its -file variant with a mounted Secret"))
    return out


def validate_files(paths: list[Path], versions: list[str]) -> int:
    problems = 0
    for path in paths:
        docs = load(path)
        if not docs:
            print(f"{path}: renders no object", file=sys.stderr)
            problems += 1
            continue
        count = 0
        for doc in docs:
            for err in schema_errors(doc, versions):
                print(f"{path}: {ident(doc)}: {err}", file=sys.stderr)
                problems += 1
            count += 1
        for doc, err in reference_errors(docs) + policy_errors(docs):
            print(f"{path}: {ident(doc)}: {err}", file=sys.stderr)
            problems += 1
        kinds = sorted({d.get("kind") for d in docs})
        print(f"{path}: {count} objects ({', '.join(kinds)})")
    return problems


# --- negative self-check ----------------------------------------------------
def _first(docs, kind):
    for d in docs:
        if d.get("kind") == kind:
            return d
    raise SystemExit(f"mutate: no {kind} in the input")


def mutate(kind: str, docs: list[dict]) -> list[dict]:
    """Break a copy of `docs` in one specific way that must be caught."""
    docs = copy.deepcopy(docs)
    if kind == "unknown-field":  # a typo in a field name (strict schema)
        c = _first(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        c["readinesProbe"] = c.pop("readinessProbe")
    elif kind == "wrong-type":  # a string where an integer is required
        c = _first(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        c["ports"][0]["containerPort"] = "seventy"
    elif kind == "missing-required":  # a Service port without its port number
        del _first(docs, "Service")["spec"]["ports"][0]["port"]
    elif kind == "dangling-selector":  # valid YAML and schema, wrong wiring
        _first(docs, "Service")["spec"]["selector"]["app.kubernetes.io/name"] = "nothing"
    elif kind == "crd-typo":  # a misspelt field in the custom resource
        ep = _first(docs, "ServiceMonitor")["spec"]["endpoints"][0]
        ep["intervall"] = ep.pop("interval")
    elif kind == "rule-typo":  # a misspelt field in a PrometheusRule rule
        rule = _first(docs, "PrometheusRule")["spec"]["groups"][0]["rules"][0]
        rule["exp"] = rule.pop("expr")
    elif kind == "unpinned-image":  # the image's tag lost (`latest`)
        c = _first(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        c["image"] = c["image"].rsplit(":", 1)[0]
    elif kind == "missing-probe":  # a server without readiness probe
        del _first(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    elif kind == "secret-in-args":  # a token expanded into the command line
        c = _first(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        c.setdefault("env", []).append(
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": _first(docs, "Secret")["metadata"]["name"], "key": "t"}}}
        )
        c["args"].append("--flag=$(T)")
    else:
        raise SystemExit(f"mutate: unknown mutation {kind}")
    return docs


MUTATIONS = [
    "unknown-field",
    "wrong-type",
    "missing-required",
    "dangling-selector",
    "crd-typo",
    "rule-typo",
    "unpinned-image",
    "missing-probe",
    "secret-in-args",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k8s-version", action="append", default=[], help="Kubernetes version to validate against (repeatable)")
    ap.add_argument("--mutate", nargs=3, metavar=("KIND", "IN", "OUT"), help=f"write a broken copy; KIND in {MUTATIONS}")
    ap.add_argument("--list-mutations", action="store_true")
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args()
    if args.list_mutations:
        print("\n".join(MUTATIONS))
        return 0
    if args.mutate:
        kind, src, dst = args.mutate
        with open(dst, "w") as f:
            yaml.safe_dump_all(mutate(kind, load(Path(src))), f, sort_keys=False)
        return 0
    if not args.files or not args.k8s_version:
        ap.print_usage(sys.stderr)
        return 2
    problems = validate_files(args.files, args.k8s_version)
    if problems:
        print(f"{problems} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
