"""The references between rendered objects, which no schema sees: selectors, ports by name
and number, ConfigMaps, the Secret's keys, the ServiceAccount and its Role, probes that mean
what they say, and the few CRD validation rules (CEL) that apply here. Each check returns the
problems it found, naming the object and the reference."""

from __future__ import annotations

from tests.deploy import manifests as m

CORRAL_HEALTH = "/health"
PICKER_HEALTH = "/healthz"


def consistency_problems(objs: list[m.Obj]) -> list[str]:
    """What the schemas cannot see; each problem names the object and the reference."""
    problems: list[str] = []
    problems += _service_problems(objs)
    problems += _workload_problems(objs)
    problems += _pool_problems(objs)
    problems += _route_problems(objs)
    problems += _monitor_problems(objs)
    problems += _rbac_problems(objs)
    problems += _probe_problems(objs)
    for budget in m.find(objs, "PodDisruptionBudget"):
        if not m.selected_workloads(objs, budget["spec"]["selector"]["matchLabels"]):
            problems.append(f"{m.name_of(budget)}: selector matches no pod template")
    return problems


def _service_problems(objs: list[m.Obj]) -> list[str]:
    problems = []
    for service in m.find(objs, "Service"):
        selector = service["spec"].get("selector", {})
        targets = m.selected_workloads(objs, selector)
        if not targets:
            problems.append(f"{m.name_of(service)}: selector {selector} matches no pod template")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in targets:
                ports = m.container_ports(workload)
                if target not in ports and target not in ports.values():
                    problems.append(f"{m.name_of(service)}: targetPort {target!r} is no port of "
                                    f"{m.name_of(workload)}")
    return problems


def _workload_problems(objs: list[m.Obj]) -> list[str]:
    problems = []
    for workload in m.workloads(objs):
        spec = m.pod_spec(workload)
        selector = workload["spec"]["selector"]["matchLabels"]
        if not m.matches(selector, m.pod_labels(workload)):
            problems.append(f"{m.name_of(workload)}: selector does not match its pod template")
        for volume in spec.get("volumes", []):
            name = volume.get("configMap", {}).get("name")
            if name is not None and not m.find(objs, "ConfigMap", name):
                problems.append(f"{m.name_of(workload)}: volume {volume['name']} names ConfigMap "
                                f"{name}, which is not rendered")
        account = spec.get("serviceAccountName")
        if account is not None and not m.find(objs, "ServiceAccount", account):
            problems.append(f"{m.name_of(workload)}: ServiceAccount {account} is not rendered")
        if workload["kind"] == "StatefulSet":
            service = workload["spec"]["serviceName"]
            if not m.find(objs, "Service", service):
                problems.append(f"{m.name_of(workload)}: serviceName {service} is not rendered")
    for secret, key in sorted(m.secret_refs(objs)):
        if secret != m.KEYS_SECRET:
            problems.append(f"Secret {secret} (key {key}) is neither rendered nor {m.KEYS_SECRET}")
    return problems


def _pool_problems(objs: list[m.Obj]) -> list[str]:
    problems = []
    for pool in m.find(objs, "InferencePool"):
        spec = pool["spec"]
        members = m.selected_workloads(objs, spec["selector"]["matchLabels"])
        if not members:
            problems.append(f"{m.name_of(pool)}: selector matches no pod template")
        for member in members:
            numbers = set(m.container_ports(member).values())
            for port in spec["targetPorts"]:
                if port["number"] not in numbers:
                    problems.append(f"{m.name_of(pool)}: targetPort {port['number']} is no port "
                                    f"of {m.name_of(member)}")
        ref = spec["endpointPickerRef"]
        # The CRD's CEL rule: a Service reference needs its port.
        if ref.get("kind", "Service") == "Service":
            services = m.find(objs, "Service", ref["name"])
            if "port" not in ref:
                problems.append(f"{m.name_of(pool)}: endpointPickerRef to a Service needs a port")
            elif not services:
                problems.append(f"{m.name_of(pool)}: endpointPickerRef names Service "
                                f"{ref['name']}, which is not rendered")
            elif ref["port"]["number"] not in [p["port"] for p in services[0]["spec"]["ports"]]:
                problems.append(f"{m.name_of(pool)}: endpointPickerRef port "
                                f"{ref['port']['number']} is no port of {m.name_of(services[0])}")
    return problems


def _route_problems(objs: list[m.Obj]) -> list[str]:
    problems = []
    for route in m.find(objs, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for ref in rule.get("backendRefs", []):
                group, kind = ref.get("group", ""), ref.get("kind", "Service")
                if group == "inference.networking.k8s.io" and kind == "InferencePool":
                    if not m.find(objs, "InferencePool", ref["name"]):
                        problems.append(f"{m.name_of(route)}: backendRef names InferencePool "
                                        f"{ref['name']}, which is not rendered")
                elif not (group == "" and kind == "Service" and m.find(objs, "Service",
                                                                      ref["name"])):
                    problems.append(f"{m.name_of(route)}: backendRef {group}/{kind} "
                                    f"{ref['name']} is not rendered")
    return problems


def _monitor_problems(objs: list[m.Obj]) -> list[str]:
    problems = []
    for monitor in m.find(objs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in m.find(objs, "Service")
                    if m.matches(selector, s["metadata"].get("labels", {}))]
        if not services:
            problems.append(f"{m.name_of(monitor)}: selector matches no Service's labels")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in services:
                if endpoint["port"] not in [p.get("name") for p in service["spec"]["ports"]]:
                    problems.append(f"{m.name_of(monitor)}: port {endpoint['port']!r} is no "
                                    f"named port of {m.name_of(service)}")
    return problems


def _rbac_problems(objs: list[m.Obj]) -> list[str]:
    problems = []
    for binding in m.find(objs, "RoleBinding"):
        role = binding["roleRef"]["name"]
        if not m.find(objs, binding["roleRef"]["kind"], role):
            problems.append(f"{m.name_of(binding)}: roleRef {role} is not rendered")
        for subject in binding["subjects"]:
            if subject["kind"] == "ServiceAccount" and (
                    "namespace" not in subject or not m.find(objs, "ServiceAccount",
                                                          subject["name"])):
                problems.append(f"{m.name_of(binding)}: subject ServiceAccount "
                                f"{subject['name']} is not rendered, or has no namespace")
    # The picker's account may read EndpointSlices (its discovery), and nothing else.
    for picker in m.find(objs, "Deployment", "corral-picker"):
        account = m.pod_spec(picker).get("serviceAccountName")
        roles = [b["roleRef"]["name"] for b in m.find(objs, "RoleBinding")
                 if any(s["name"] == account for s in b["subjects"])]
        rules = [rule for role in roles for r in m.find(objs, "Role", role)
                 for rule in r["rules"]]
        if not any("discovery.k8s.io" in r["apiGroups"] and "endpointslices" in r["resources"]
                   and {"get", "list", "watch"} <= set(r["verbs"]) for r in rules):
            problems.append(f"{m.name_of(picker)}: its ServiceAccount {account} may not get, "
                            "list and watch EndpointSlices")
        if any(set(r["verbs"]) - {"get", "list", "watch"} for r in rules):
            problems.append(f"{m.name_of(picker)}: its ServiceAccount may do more than read")
    return problems


def _probe_problems(objs: list[m.Obj]) -> list[str]:
    """Readiness and start-up ask corral's /health (503 while it drains); liveness accepts any
    HTTP answer from it; the picker's readiness is its gRPC health, liveness its /healthz."""
    problems = []
    for server in m.find(objs, "StatefulSet", "corral"):
        container = m.pod_spec(server)["containers"][0]
        for kind in ("readinessProbe", "startupProbe"):
            probe = container.get(kind, {})
            path = probe.get("httpGet", {}).get("path")
            if path != CORRAL_HEALTH:
                problems.append(f"{m.name_of(server)}: {kind} asks {path!r}, not "
                                f"{CORRAL_HEALTH}")
        command = " ".join(container.get("livenessProbe", {}).get("exec", {})
                           .get("command", []))
        listen = m.config_file(objs, server, m.config_arg(server))["listen"]["port"]
        if f"'{CORRAL_HEALTH}'" not in command or f", {listen}," not in command:
            problems.append(f"{m.name_of(server)}: livenessProbe does not ask "
                            f"{CORRAL_HEALTH} on corral's port {listen}")
    for picker in m.find(objs, "Deployment", "corral-picker"):
        container = m.pod_spec(picker)["containers"][0]
        ports = m.container_ports(picker)
        listen = m.config_file(objs, picker, m.config_arg(picker))["listen"]
        grpc = container.get("readinessProbe", {}).get("grpc", {}).get("port")
        if grpc != listen["grpc"]["port"]:
            problems.append(f"{m.name_of(picker)}: readinessProbe grpc port {grpc} is not the "
                            f"picker's gRPC port {listen['grpc']['port']}")
        live = container.get("livenessProbe", {}).get("httpGet", {})
        if live.get("path") != PICKER_HEALTH or ports.get(live.get("port")) != (
                listen["http"]["port"]):
            problems.append(f"{m.name_of(picker)}: livenessProbe is not {PICKER_HEALTH} on the "
                            "picker's HTTP port")
    return problems
