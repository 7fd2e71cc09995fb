"""A real Prometheus for tests, and the PromQL held by corral's dashboards and alert rules."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import free_port


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from, for failure messages."""

    source: str
    expr: str


# -- Grafana dashboards --------------------------------------------------------------------------


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows (collapsed rows hold their own ``panels``)."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def load_dashboard(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panel_queries(path: Path) -> list[Query]:
    """The ``expr`` of every target of every panel of the dashboard at ``path``."""
    found = []
    for panel in walk_panels(load_dashboard(path).get("panels", [])):
        for target in panel.get("targets", []):
            found.append(Query(f"{path.name}: panel {panel.get('title')!r} target "
                               f"{target.get('refId')}", target.get("expr", "")))
    return found


def variable_queries(path: Path) -> list[Query]:
    """The queries of the dashboard's template variables of type ``query``."""
    found = []
    for variable in load_dashboard(path).get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            found.append(Query(f"{path.name}: variable {variable.get('name')!r}", text))
    return found


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana's ``$name``, ``${name}``, ``${name:format}`` and ``[[name]]``.

    An unknown variable is an error, so a dashboard cannot use one the tests do not know about.
    """

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"unknown Grafana variable {name!r} in {expr!r}")
        return values[name]

    return VARIABLE.sub(one, expr)


# -- alert rules ---------------------------------------------------------------------------------


def alert_queries(path: Path) -> list[Query]:
    rules = yaml.safe_load(path.read_text())
    return [Query(f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in rules["groups"] for rule in group["rules"]]


COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
OPENERS, CLOSERS = "([{", ")]}"
MODIFIERS = re.compile(
    r"^\s*(?:bool\b\s*)?(?:(?:on|ignoring)\s*\([^)]*\)\s*)?"
    r"(?:(?:group_left|group_right)\b\s*(?:\([^)]*\))?\s*)?")
NUMBER = re.compile(r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*$")


def outer_comparison(expr: str) -> tuple[int, str] | None:
    """Where the first comparison outside parentheses, brackets, braces and strings is."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in OPENERS:
            depth += 1
        elif char in CLOSERS:
            depth -= 1
        elif depth == 0:
            for op in COMPARISONS:
                if expr.startswith(op, i):
                    return i, op
        i += 1
    return None


def comparison_operands(expr: str) -> list[str]:
    """The operands of ``expr``'s outermost comparison that are not plain numbers.

    ``sum(rate(x[5m])) > 0`` gives ``["sum(rate(x[5m]))"]``; ``a >= on (model) b`` gives
    ``["a", "b"]`` (the matching modifiers belong to the operator); an expression without a
    comparison is its own only operand.
    """
    found = outer_comparison(expr)
    if found is None:
        return [expr.strip()]
    at, op = found
    left, right = expr[:at], MODIFIERS.sub("", expr[at + len(op):], count=1)
    return [side.strip() for side in (left, right) if not NUMBER.match(side)]


# -- Prometheus ----------------------------------------------------------------------------------


def has_data(body: dict[str, Any]) -> bool:
    """Whether an instant query's answer holds at least one finite value."""
    data = body.get("data", {})
    result = data.get("result")
    if data.get("resultType") == "scalar":
        values = [result[1]]
    elif data.get("resultType") == "vector":
        values = [sample["value"][1] for sample in result]
    else:  # matrix or string: not what a dashboard's instant query gives
        values = []
    return any(math.isfinite(float(value)) for value in values)


class Prometheus:
    """``prometheus`` as a subprocess on a free port, with its storage under ``workdir``."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                     f"{self.log()[-4000:]}")
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {what} not within {timeout}s:\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(0.2)

    def wait_ready(self) -> None:
        self.wait_for(lambda: self.http.get("/-/ready", timeout=2.0).status_code == 200,
                      "ready")

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The API's whole answer (``status`` error included) to an instant query."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        body: dict[str, Any] = self.http.post("/api/v1/query", data=params).json()
        return body

    def values(self, expr: str, at: float | None = None) -> list[float]:
        """The values of a query that must succeed (an empty list when it matches nothing)."""
        body = self.query(expr, at)
        assert body["status"] == "success", f"{expr}: {body}"
        if body["data"]["resultType"] == "scalar":
            return [float(body["data"]["result"][1])]
        return [float(sample["value"][1]) for sample in body["data"]["result"]]

    def get(self, path: str, **params: Any) -> Any:
        body = self.http.get(path, params=params).json()
        assert body["status"] == "success", f"{path}: {body}"
        return body["data"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()
