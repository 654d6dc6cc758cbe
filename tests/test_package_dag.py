"""Package imports follow the DAG written in docs/architecture.md, with no cycle.

Every `import megatron.X...` / `from megatron.X... import` anywhere in a module (top level or
inside a function) counts, so a cycle cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOT = ROOT / "megatron"


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron" and len(parts) > 1:
                out.add(parts[1])
    return out


def package_graph() -> dict[str, set[str]]:
    """package -> the other megatron packages its modules import."""
    graph: dict[str, set[str]] = {}
    for pkg in sorted(p for p in PACKAGE_ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"):
        deps: set[str] = set()
        for path in pkg.rglob("*.py"):
            deps |= _imported_packages(path)
        graph[pkg.name] = deps - {pkg.name}
    return graph


def documented_dag() -> dict[str, set[str]]:
    """The allowed edges, read from the `package -> may import` table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Package dependencies", 1)[1].split("\n## ", 1)[0]
    allowed: dict[str, set[str]] = {}
    for row in re.findall(r"^\|\s*`(\w+)`\s*\|([^|]*)\|", section, flags=re.M):
        allowed[row[0]] = set(re.findall(r"`(\w+)`", row[1]))
    return allowed


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep] if dep in stack else [node, dep]
            if state.get(dep) is None:
                found = visit(dep, [*stack, dep])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_cycle_finder_sees_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_documented_dag_is_acyclic() -> None:
    allowed = documented_dag()
    assert allowed, "docs/architecture.md has no package dependency table"
    assert _find_cycle(allowed) is None


def test_packages_import_only_what_the_dag_allows() -> None:
    allowed = documented_dag()
    graph = package_graph()
    undocumented = sorted(set(graph) - set(allowed))
    assert not undocumented, f"packages missing from docs/architecture.md: {undocumented}"
    violations = {
        pkg: sorted(deps - allowed[pkg]) for pkg, deps in graph.items() if deps - allowed[pkg]
    }
    assert not violations, f"imports outside the documented DAG: {violations}"
    assert _find_cycle(graph) is None
