"""The layout holds: no import cycle among corral's modules, and ``corral plan`` runs without
the supervisor (placement and host I/O only)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every ``import`` anywhere in a module (inside functions and ``TYPE_CHECKING`` too)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from corral.x import y`: y may be a module of the package x, or a name in it.
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_there_is_no_import_cycle_among_corrals_modules() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "corral.supervisor.model" in graph["corral.supervisor"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_corral_plan_does_not_import_the_supervisor(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"not a model")  # plan reports it; importing is what is checked
    config = tmp_path / "corral.yaml"
    config.write_text(yaml.safe_dump({"models": {"m": {"path": str(model)}},
                                      "devices": [{"id": "cpu", "memory": "8GiB"}]}))
    script = (
        "import sys\n"
        "from corral.cli import main\n"
        f"main(['plan', '-c', {str(config)!r}])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('corral.'))\n"
        "print('LOADED', ' '.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = out.split("LOADED", 1)[1].split()
    assert "corral.planreport" in loaded and "corral.llamacpp.command" in loaded
    assert [m for m in loaded if m.startswith(("corral.supervisor", "corral.proxy"))] == []
