"""The Grafana dashboards and the example's alert rules, asked of a real Prometheus that scrapes a
real corral serving SmolLM2: every expression is valid and returns data.

Dashboards are queried the way Grafana would, with its variables replaced: ``$model`` by the
model served here, ``$__rate_interval``, ``$__interval`` and ``$__range`` by a window that
covers everything Prometheus scraped, so that rates and quantiles see all of the traffic.
Each query is an instant query at the time of the last successful scrape, and must answer at
least one finite value, except the expressions in ``MAY_BE_EMPTY``, which must only be valid.

Alert rules are conditions, expected false here. Each rule's whole expression must be valid;
then each operand of its outermost comparison (the rule without its threshold, and both sides
of a vector-to-vector comparison) must return data like a dashboard query.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ENDLESS, ROOT, CorralProcess, holding_a_slot
from tests.metrics.promql import (
    LABEL_VALUES,
    Prometheus,
    alert_queries,
    comparison_operands,
    has_data,
    load_dashboard,
    panel_queries,
    substitute,
    variable_queries,
    walk_panels,
)

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
StartPrometheus = Callable[[CorralProcess], Prometheus]

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
MONITORING = ROOT / "examples" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = "smollm2"

# Expressions that may return no data, with the reason. Every metric the dashboards read is
# exported now, so none may.
MAY_BE_EMPTY: dict[str, str] = {}

# Generous: on a busy two-core machine a 120-token answer can take tens of seconds.
SLOW = 180.0
CHAT = [{"role": "user", "content": "Tell me a story about a llama."}]


def chat(tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": CHAT, "max_tokens": tokens, "ignore_eos": True,
            "stream": stream}


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run scripts/install-system-deps (Debian: prometheus)")
    return found


def scrape_config(server: CorralProcess) -> dict[str, Any]:
    """The example's prometheus.yml, scraping this corral every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    return config


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[StartPrometheus]:
    started: list[Prometheus] = []

    def start(server: CorralProcess) -> Prometheus:
        prom = Prometheus(binary("prometheus"), tmp_path / "prometheus", scrape_config(server))
        started.append(prom)
        prom.wait_ready()
        return prom

    yield start
    for prom in started:
        prom.close()


def last_good_scrape(prom: Prometheus) -> float:
    """The time of corral's latest scrape, once it succeeded: every series has a sample there.

    Evaluating at that time, rather than at "now", keeps a scrape failing just afterwards (and
    its staleness markers) out of the answers.
    """
    found: list[float] = []

    def scraped() -> bool:
        stamps = prom.values('timestamp(up{job="corral"})')
        if stamps and prom.values('up{job="corral"}', at=stamps[0]) == [1.0]:
            found.append(stamps[0])
            return True
        return False

    prom.wait_for(scraped, "a successful scrape of corral")
    return found[-1]


def post_chat(server: CorralProcess, tokens: int, stream: bool = False) -> int:
    response = server.http.post("/v1/chat/completions", json=chat(tokens, stream),
                                timeout=SLOW)
    return response.status_code


def drive_traffic(server: CorralProcess) -> int:
    """Streamed and plain chats, then two streams that hold both slots while two requests fill
    the queue (max 2), and one request that the full queue refuses. Returns how many requests
    corral answered."""
    for tokens, stream in ((8, True), (16, False), (12, True), (4, False)):
        assert post_chat(server, tokens, stream) == 200
    with ThreadPoolExecutor(2) as pool, contextlib.ExitStack() as holders:
        for _ in range(2):
            holders.enter_context(holding_a_slot(server, MODEL))
        queued = [pool.submit(post_chat, server, 8) for _ in range(2)]
        server.wait_for(lambda: server.model_status(MODEL)["queue_depth"] == 2, timeout=SLOW)
        assert post_chat(server, 4) == 429
        holders.close()  # the two streams' clients leave (499): the queued two go through
        assert [f.result() for f in queued] == [200] * 2
    return 4 + 2 + 2 + 1


def grafana_values(prom: Prometheus, at: float) -> dict[str, str]:
    window = f"{math.ceil(at - prom.started) + 5}s"
    return {"datasource": "prometheus", "model": MODEL, "__rate_interval": window,
            "__interval": window, "__range": window}


def check_dashboards(prom: Prometheus, at: float) -> list[str]:
    """What is wrong with the dashboards' queries at time ``at`` (nothing: an empty list)."""
    values = grafana_values(prom, at)
    problems = []
    for path in DASHBOARDS:
        for query in panel_queries(path):
            expr = substitute(query.expr, values)
            body = prom.query(expr, at)
            if body.get("status") != "success":
                problems.append(f"{query.source}: invalid: {body.get('error')}\n    {expr}")
            elif query.expr not in MAY_BE_EMPTY and not has_data(body):
                problems.append(f"{query.source}: no data: {body['data']}\n    {expr}")
        for query in variable_queries(path):
            match = LABEL_VALUES.match(query.expr)
            if match is None:
                body = prom.query(substitute(query.expr, values), at)
                ok = body.get("status") == "success" and has_data(body)
            else:
                params = {"match[]": match["match"]} if match["match"] else {}
                ok = MODEL in prom.get(f"/api/v1/label/{match['label']}/values", **params)
            if not ok:
                problems.append(f"{query.source}: {MODEL!r} not among its values: {query.expr}")
    return problems


def check_alerts(prom: Prometheus, at: float) -> list[str]:
    problems = []
    for query in alert_queries(ALERTS):
        body = prom.query(query.expr, at)
        if body.get("status") != "success":
            problems.append(f"{query.source}: invalid: {body.get('error')}\n    {query.expr}")
            continue
        for operand in comparison_operands(query.expr):
            if not has_data(prom.query(operand, at)):
                problems.append(f"{query.source}: no data without its threshold\n    {operand}")
    return problems


def test_every_dashboard_and_alert_query_returns_data(
    corral: Start, smollm2: Path, prometheus: StartPrometheus
) -> None:
    server = corral({"models": {MODEL: {
        "path": str(smollm2), "slots": 2, "ctx_per_slot": 512,
        "queue": {"max": 2, "timeout": "180s"},
        # llama.cpp's threads spin on each other: with others' processes on two cores, two
        # threads decode far slower than one. ENDLESS: the test holds both slots with streams.
        "args": ["--threads", "1", *ENDLESS]}}})
    prom = prometheus(server)
    # Scraped before the load and the traffic, so that rates see every increase.
    prom.wait_for(lambda: prom.values('count_over_time(up{job="corral"}[1m]) >= 2') != [],
                  "two scrapes of corral")
    assert server.http.post(f"/admin/models/{MODEL}/load").status_code == 200
    prom.wait_for(lambda: prom.values(f'corral_model_state{{model="{MODEL}",state="ready"}}')
                  == [1.0] and prom.values(f'corral_slot_busy{{model="{MODEL}"}}') != [],
                  "the model ready, with its slots")
    answered = drive_traffic(server)
    prom.wait_for(lambda: prom.values(f'sum(corral_requests_total{{model="{MODEL}"}})')
                  == [answered], f"the {answered} requests counted")
    prom.wait_for(lambda: prom.values(f'sum(corral_queue_rejected_total{{model="{MODEL}"}})')
                  == [1.0], "the rejection counted")

    # Retried for a while: a scrape that missed a slow child's /slots leaves its series out.
    deadline = time.monotonic() + 30.0
    while True:
        at = last_good_scrape(prom)
        problems = check_dashboards(prom, at) + check_alerts(prom, at)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert not problems, "\n".join(problems)

    def rules_healthy() -> bool:
        rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert len(rules) == len(alert_queries(ALERTS))
        broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] == "err"]
        assert not broken, broken
        return all(r["health"] == "ok" for r in rules)

    prom.wait_for(rules_healthy, "every rule evaluated")

    def rejected_alert() -> bool:
        return any(a["labels"]["alertname"] == "CorralRequestsRejected"
                   and a["labels"].get("model") == MODEL and a["labels"].get("reason") == "full"
                   for a in prom.get("/api/v1/alerts")["alerts"])

    prom.wait_for(rejected_alert, "CorralRequestsRejected pending or firing")


def test_dashboards_are_portable_and_complete() -> None:
    assert [p.name for p in DASHBOARDS] == ["corral-model.json", "corral-overview.json"]
    exprs = set()
    for path in DASHBOARDS:
        board = load_dashboard(path)
        assert 36 <= board["schemaVersion"] <= 41, path.name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["model"]["datasource"] == DATASOURCE
        panels = list(walk_panels(board["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels:
            where = f"{path.name}: {panel['title']!r}"
            if panel["type"] == "row":
                continue
            assert panel["type"] in {"timeseries", "stat", "bargauge", "table",
                                     "state-timeline"}, where
            assert panel["datasource"] == DATASOURCE, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, where
                assert target["expr"].strip(), where
                exprs.add(target["expr"])
                for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
                    # Grafana's windows: at least four scrapes, whatever the scrape interval.
                    assert window in ("$__rate_interval", "$__range"), f"{where}: [{window}]"
        # No data source but the variable, anywhere (a uid from someone's Grafana would break
        # the dashboard on every other).
        uids = set(re.findall(r'"uid":\s*"([^"]*)"', path.read_text()))
        assert uids <= {"${datasource}", "-- Grafana --", board["uid"]}, uids
    stale = set(MAY_BE_EMPTY) - exprs
    assert not stale, f"MAY_BE_EMPTY names expressions no dashboard has: {stale}"


@pytest.mark.parametrize(("expr", "operands"), [
    ("up == 0", ["up"]),
    ('sum by (m) (rate(x{a=">"}[5m])) > 0', ['sum by (m) (rate(x{a=">"}[5m]))']),
    ("avg_over_time(q[5m]) >= on (model) s", ["avg_over_time(q[5m])", "s"]),
    ("a / on (d) group_left sum by (d) (b) > bool 0.5", ["a / on (d) group_left sum by (d) (b)"]),
    ("histogram_quantile(0.9, rate(h[1m]))", ["histogram_quantile(0.9, rate(h[1m]))"]),
])
def test_comparison_operands(expr: str, operands: list[str]) -> None:
    assert comparison_operands(expr) == operands


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_promtool_accepts_the_rules_and_the_config() -> None:
    for args in (("check", "rules", str(ALERTS)), ("check", "config", str(PROMETHEUS_CONFIG))):
        result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_accepts_corral_metrics(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {MODEL: {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512,
                                        "args": ["--threads", "1"]}}})
    for stream in (False, True):
        assert post_chat(server, 6, stream) == 200
    text = server.http.get("/metrics").text
    assert "llamacpp_requests_processing" in text and "corral_slot_busy" in text
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"


def test_prometheus_config_scrapes_corral_with_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "corral"
    assert job["static_configs"] == [{"targets": ["corral:8080"]}]
    compose = yaml.safe_load((MONITORING / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"corral", "prometheus", "grafana"}
    mounts = [v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"]]
    provider = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "corral.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert ["../../grafana/dashboards", path] in mounts
    assert ["../../grafana/provisioning", "/etc/grafana/provisioning"] in mounts

