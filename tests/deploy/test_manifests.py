"""deploy/kubernetes, rendered by kustomize and checked offline: every object against the
Kubernetes API schemas and the CRDs' own, the references between them, corral's own config
loader on the ConfigMap, and the liveness probe's command against real sockets. The tests
that break a manifest on purpose show each check can fail. No cluster is involved: what only a
cluster can prove is listed in the README ("corral on Kubernetes")."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.config.loader import parse_config
from tests.conftest import CorralProcess
from tests.deploy import manifests as m
from tests.deploy import references

# The oldest Kubernetes the manifests are for (README) and the newest the schemas bundle.
K8S_VERSIONS = ["1.29", "1.37"]
EXPECTED = {
    "Namespace/corral", "ServiceAccount/corral-picker", "Role/corral-picker",
    "RoleBinding/corral-picker", "ConfigMap/corral-grafana-dashboards", "Service/corral",
    "Service/corral-picker", "Deployment/corral-picker", "StatefulSet/corral",
    "HTTPRoute/corral", "InferencePool/corral", "ServiceMonitor/corral",
    "ServiceMonitor/corral-picker", "PodDisruptionBudget/corral",
    "PodDisruptionBudget/corral-picker",
}


@pytest.fixture(scope="module")
def objs() -> list[m.Obj]:
    return m.render()


def test_renders_every_object_in_one_namespace(objs: list[m.Obj]) -> None:
    names = {m.name_of(o) for o in objs}
    # The two config ConfigMaps carry a hash of their content in their names.
    hashed = {n for n in names if n.startswith(("ConfigMap/corral-config-",
                                                 "ConfigMap/corral-picker-config-"))}
    assert names - hashed == EXPECTED
    assert len(hashed) == 2
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"corral"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_against_its_schema(objs: list[m.Obj], version: str) -> None:
    assert m.schema_problems(objs, version) == []


def test_objects_reference_each_other_correctly(objs: list[m.Obj]) -> None:
    assert references.consistency_problems(objs) == []


def test_corral_config_loads_with_the_mounted_secret(objs: list[m.Obj], tmp_path: Path) -> None:
    """corral's own loader accepts the ConfigMap's corral.yaml, its key files are the Secret's
    keys as the StatefulSet mounts them, and its port and cache are the pod's."""
    server = m.find(objs, "StatefulSet", "corral")[0]
    data = m.config_file(objs, server, m.config_arg(server))
    spec = m.pod_spec(server)
    mounts = {mt["name"]: mt["mountPath"] for mt in spec["containers"][0]["volumeMounts"]}
    keys_volume = next(v for v in spec["volumes"] if v.get("secret"))
    mounted = {f"{mounts[keys_volume['name']]}/{item['path']}": item["key"]
               for item in keys_volume["secret"]["items"]}
    for i, key in enumerate(data["auth"]["keys"]):
        assert key["key_file"] in mounted, f"auth.keys.{i} reads a file no Secret key is at"
        local = tmp_path / mounted[key["key_file"]]
        local.write_text(f"{'k' * 30}{i:02d}\n")  # as `kubectl create secret --from-file`
        key["key_file"] = str(local)
    config = parse_config(data, source="corral.yaml")
    assert {k.name for k in config.api_keys} == {"clients", "picker", "prometheus"}
    assert config.file.listen.port == m.container_ports(server)["http"]
    models_mount = next(mt["mountPath"] for mt in spec["containers"][0]["volumeMounts"]
                        if mt["name"] == "models")
    assert server["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "models"
    for model in config.models.values():
        assert model.download_dir is not None
        assert model.download_dir.startswith(models_mount + "/")


def test_corral_as_deployed_answers_probes_picker_and_prometheus(
    objs: list[m.Obj], corral: Callable[..., CorralProcess], tmp_path: Path
) -> None:
    """A real corral with the deployed auth (its models left out, on loopback): the kubelet's
    probes need no key, the liveness command passes, and each key reaches what it is for."""
    server = m.find(objs, "StatefulSet", "corral")[0]
    data = m.config_file(objs, server, m.config_arg(server))
    secrets = {}
    for key in data["auth"]["keys"]:
        secrets[key["name"]] = f"{key['name']}-{'s' * 24}"
        local = tmp_path / key["name"]
        local.write_text(secrets[key["name"]] + "\n")
        key["key_file"] = str(local)
    data["listen"]["host"] = "127.0.0.1"
    data.pop("llama_server")
    data["models"] = {}
    running = corral(data)

    def get(path: str, key: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {secrets[key]}"} if key else {}
        return running.http.get(path, headers=headers).status_code

    assert get("/health") == 200  # readiness and start-up probes carry no key
    assert get("/metrics") == 401 and get("/metrics", "clients") == 403
    assert get("/metrics", "prometheus") == 200
    assert get("/admin/status") == 401 and get("/admin/status", "clients") == 403
    assert get("/admin/status", "picker") == 200
    liveness = subprocess.run(_liveness_command(objs, running.port), capture_output=True,
                              timeout=60, check=False)
    assert liveness.returncode == 0, liveness.stderr


def test_the_secret_keys_read_are_the_documented_ones(objs: list[m.Obj]) -> None:
    """The README's `kubectl create secret generic corral-keys` makes exactly the keys read."""
    readme = (m.ROOT / "README.md").read_text()
    made = readme[readme.index("create secret generic corral-keys"):]
    made = made[:made.index("\n\n")]
    assert {key for _, key in m.secret_refs(objs)} == {
        key for key in ("clients", "picker", "prometheus") if f"--from-literal={key}=" in made}


def test_picker_discovers_the_corral_service(objs: list[m.Obj]) -> None:
    picker = m.find(objs, "Deployment", "corral-picker")[0]
    config = m.config_file(objs, picker, m.config_arg(picker))
    discovery = config["pods"]["kubernetes"]
    service = m.find(objs, "Service", discovery["service"])[0]
    assert discovery["namespace"] == service["metadata"]["namespace"]
    assert discovery["port"] in [p["port"] for p in service["spec"]["ports"]]
    assert m.selected_workloads(objs, service["spec"]["selector"]) == m.find(
        objs, "StatefulSet", "corral")
    pool = m.find(objs, "InferencePool", "corral")[0]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == config["listen"]["grpc"]["port"]
    grpc = next(p for p in m.find(objs, "Service", "corral-picker")[0]["spec"]["ports"]
                if p["port"] == config["listen"]["grpc"]["port"])
    assert grpc["appProtocol"] == "http2"


def test_dashboards_configmap_is_the_dashboard_files(objs: list[m.Obj]) -> None:
    dashboards = m.find(objs, "ConfigMap", "corral-grafana-dashboards")[0]
    files = sorted((m.ROOT / "grafana" / "dashboards").glob("*.json"))
    assert sorted(dashboards["data"]) == [f.name for f in files]
    for f in files:
        assert dashboards["data"][f.name] == f.read_text()
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    # `kubectl apply` (client side) keeps the whole object in an annotation, which the API
    # limits to 256 KiB.
    assert len(json.dumps(dashboards)) < 256 * 1024


# ---- each check can fail ---------------------------------------------------------------------

def _set(path: str, value: Any) -> Callable[[m.Obj], None]:
    def change(obj: m.Obj) -> None:
        *parents, last = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


SCHEMA_BREAKS = [
    ("StatefulSet", "corral", "spec.template.spec.containers.0.imagePullPolcy", "Always",
     "imagePullPolcy"),
    ("StatefulSet", "corral", "spec.replicas", "3", "'3' is not of type 'integer'"),
    ("Service", "corral-picker", "spec.ports.0.port", "grpc", "'grpc' is not of type"),
    ("InferencePool", "corral", "spec.targetPorts", [{"number": "8080"}], "spec.targetPorts.0"),
    ("InferencePool", "corral", "spec.endpointPickerRef.failureMode", "Open",
     "failureMode: 'Open' is not one of"),
    ("HTTPRoute", "corral", "spec.rules.0.timeouts.request", "1 hour", "timeouts.request"),
    ("HTTPRoute", "corral", "spec.rules.0.backendRef", [], "backendRef"),
    ("ServiceMonitor", "corral", "spec.endpoints.0.bearerToken", "x", "bearerToken"),
    ("ServiceMonitor", "corral", "metadata.name", "Corral_Monitor", "metadata.name"),
]


@pytest.mark.parametrize(("kind", "name", "path", "value", "expected"), SCHEMA_BREAKS)
def test_a_broken_object_fails_its_schema(
    objs: list[m.Obj], kind: str, name: str, path: str, value: Any, expected: str
) -> None:
    broken, obj = m.mutated(objs, kind, name)
    _set(path, value)(obj)
    problems = m.schema_problems(broken, K8S_VERSIONS[0])
    # Only the broken object is named, and the problem says what is wrong.
    assert problems and all(p.startswith(f"{m.name_of(obj)}: ") for p in problems), problems
    assert expected in " ".join(problems)


def _drop_watch(role: m.Obj) -> None:
    role["rules"][0]["verbs"] = ["get", "list"]


REFERENCE_BREAKS: list[tuple[str, str, Callable[[m.Obj], None], str]] = [
    ("Service", "corral", _set("spec.selector", {"app.kubernetes.io/name": "korral"}),
     "matches no pod template"),
    ("InferencePool", "corral", _set("spec.targetPorts", [{"number": 8000}]),
     "targetPort 8000 is no port of StatefulSet/corral"),
    ("InferencePool", "corral", _set("spec.endpointPickerRef.port", {"number": 9003}),
     "endpointPickerRef port 9003"),
    ("HTTPRoute", "corral", _set("spec.rules.0.backendRefs.0.name", "corral-pool"),
     "InferencePool corral-pool, which is not rendered"),
    ("ServiceMonitor", "corral", _set("spec.endpoints.0.port", "metrics"),
     "port 'metrics' is no named port of Service/corral"),
    ("Role", "corral-picker", _drop_watch, "may not get, list and watch EndpointSlices"),
    ("StatefulSet", "corral",
     _set("spec.template.spec.containers.0.readinessProbe.httpGet.path", "/v1/models"),
     "readinessProbe asks '/v1/models'"),
    ("StatefulSet", "corral", _set("spec.template.spec.volumes.1.secret.secretName", "keys"),
     "Secret keys (key clients) is neither rendered"),
    ("Deployment", "corral-picker",
     _set("spec.template.spec.containers.0.readinessProbe.grpc.port", 9090),
     "readinessProbe grpc port 9090"),
    ("PodDisruptionBudget", "corral-picker",
     _set("spec.selector.matchLabels", {"app.kubernetes.io/component": "epp"}),
     "PodDisruptionBudget/corral-picker: selector matches no pod template"),
]


@pytest.mark.parametrize(("kind", "name", "change", "expected"), REFERENCE_BREAKS)
def test_a_broken_reference_is_found(
    objs: list[m.Obj], kind: str, name: str, change: Callable[[m.Obj], None], expected: str
) -> None:
    broken, obj = m.mutated(objs, kind, name)
    change(obj)
    assert m.schema_problems(broken, K8S_VERSIONS[0]) == []  # only the reference is wrong
    problems = references.consistency_problems(broken)
    assert any(expected in p for p in problems), problems


def test_the_readme_overlay_renders_valid_objects(tmp_path: Path) -> None:
    """The overlay of the README's step 5, as a user writes it beside their checkout."""
    readme = (m.ROOT / "README.md").read_text()
    start = readme.rindex("\n", 0, readme.index("# my-corral/kustomization.yaml")) + 1
    block = readme[start:readme.index("```", start)]
    overlay = tmp_path / "my-corral"
    overlay.mkdir()
    base = Path(os.path.relpath(m.KUSTOMIZATION, overlay))
    assert "../corral/deploy/kubernetes" in block
    (overlay / "kustomization.yaml").write_text(
        textwrap.dedent(block).replace("../corral/deploy/kubernetes", str(base)))
    models = yaml.safe_load((m.KUSTOMIZATION / "corral.yaml").read_text())
    models["models"] = {"mine": {"hf": "owner/repo-GGUF:Q4_K_M"}}
    (overlay / "corral.yaml").write_text(yaml.safe_dump(models))
    objs = m.render(overlay)
    assert m.schema_problems(objs, K8S_VERSIONS[0]) == []
    assert references.consistency_problems(objs) == []
    server = m.find(objs, "StatefulSet", "corral")[0]
    assert m.pod_spec(server)["containers"][0]["image"] == "REGISTRY/corral:0.1.0"
    assert list(m.config_file(objs, server, m.config_arg(server))["models"]) == ["mine"]


def test_picker_config_is_one_the_picker_accepts(objs: list[m.Obj]) -> None:
    """picker.yaml against the picker's own config model, where this checkout has it."""
    module = pytest.importorskip("corral.picker.config",
                                 reason="the picker's config module is not in this checkout")
    from pydantic import BaseModel

    models = [value for value in vars(module).values()
              if isinstance(value, type) and issubclass(value, BaseModel)
              and {"listen", "pods"} <= set(value.model_fields)]
    assert models, "corral.picker.config has no model with listen and pods"
    picker = m.find(objs, "Deployment", "corral-picker")[0]
    models[0].model_validate(m.config_file(objs, picker, m.config_arg(picker)))


def test_a_broken_kustomization_does_not_render(tmp_path: Path) -> None:
    copy = tmp_path / "deploy" / "kubernetes"
    shutil.copytree(m.KUSTOMIZATION, copy)
    shutil.copytree(m.ROOT / "grafana", tmp_path / "grafana")
    assert {m.name_of(o) for o in m.render(copy)} >= EXPECTED  # the copy renders as it is
    (copy / "httproute.yaml").unlink()
    with pytest.raises(m.RenderError, match="httproute.yaml"):
        m.render(copy)


# ---- the liveness probe's command, run ---------------------------------------------------------

def _liveness_command(objs: list[m.Obj], port: int) -> list[str]:
    server = m.find(objs, "StatefulSet", "corral")[0]
    command = list(m.pod_spec(server)["containers"][0]["livenessProbe"]["exec"]["command"])
    assert command[0] == "python3"
    listen = m.config_file(objs, server, m.config_arg(server))["listen"]["port"]
    command[-1] = command[-1].replace(f", {listen},", f", {port},")
    return [sys.executable, *command[1:]]


@contextmanager
def _answering(status: int) -> Iterator[int]:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = b'{"status": "draining"}' if status == 503 else b'{"status": "ok"}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 503])
def test_liveness_passes_on_any_answer_draining_included(objs: list[m.Obj], status: int) -> None:
    # A stand-in HTTP server, not corral: only the probe's command is under test (corral's
    # 200 / 503 "draining" on /health is tested with corral itself in test_drain_and_reload).
    with _answering(status) as port:
        done = subprocess.run(_liveness_command(objs, port), capture_output=True, timeout=60,
                              check=False)
    assert done.returncode == 0, done.stderr


def test_liveness_fails_when_nothing_answers(objs: list[m.Obj]) -> None:
    # A socket that accepts (the kernel's backlog) but is never read: a hung event loop.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        hung = subprocess.run(_liveness_command(objs, listener.getsockname()[1]),
                              capture_output=True, timeout=60, check=False)
    assert hung.returncode != 0
    assert b"timed out" in hung.stderr
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = subprocess.run(_liveness_command(objs, port), capture_output=True, timeout=60,
                             check=False)
    assert refused.returncode != 0


def test_crd_schema_files_state_their_origin() -> None:
    for path in sorted(m.CRD_SCHEMAS.glob("*.json")):
        data = json.loads(path.read_text())
        origin = data["origin"]
        assert origin["repository"] and origin["tag"] and len(origin["commit"]) == 40, path
        assert yaml.safe_load(json.dumps(data["openAPIV3Schema"]))["type"] == "object"


def test_image_fits_the_manifests(objs: list[m.Obj]) -> None:
    """deploy/image/Dockerfile (not built here: no registry for its base images) agrees with
    what the pods expect of it: corral as the entry point, the config path, the user, the
    llama-server path of corral.yaml, and llama-server built by the project's own script."""
    image = m.ROOT / "deploy" / "image"
    dockerfile = (image / "Dockerfile").read_text()
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    instructions = {line.split(" ", 1)[0]: line.split(" ", 1)[1]
                    for line in final.splitlines() if line[:1].isupper()}
    assert json.loads(instructions["ENTRYPOINT"])[-1] == "corral"
    server = m.find(objs, "StatefulSet", "corral")[0]
    picker = m.find(objs, "Deployment", "corral-picker")[0]
    assert json.loads(instructions["CMD"]) == m.pod_spec(server)["containers"][0]["args"]
    assert m.pod_spec(picker)["containers"][0]["args"][0] == "picker"
    for workload in (server, picker):
        context = m.pod_spec(workload)["securityContext"]
        assert instructions["USER"] == f"{context['runAsUser']}:{context['runAsGroup']}"
    binary = m.config_file(objs, server, m.config_arg(server))["llama_server"]["binary"]
    assert f" {binary}\n" in final  # the link to the built llama-server
    assert "scripts/install-llama-server /opt/corral/bin" in dockerfile
    assert "-DGGML_CUDA=ON" in dockerfile
    # The build context lets in exactly what the Dockerfile copies.
    allowed = {line[1:] for line in (image / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = {source for line in dockerfile.splitlines()
              if line.startswith("COPY ") and "--from" not in line
              for source in line.split()[1:-1]}
    assert copied == allowed == {"scripts", "pyproject.toml", "README.md", "src"}
