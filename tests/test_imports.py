"""Imports point one way: no two fastgrpo modules import each other, directly or through others (imports inside
functions count too; a package importing its own submodules does not), and the layers hold: the core (everything but
the demos and the commands) reaches neither the toy worlds, the safety evaluation nor a command, and the safety
evaluation does not reach the toy worlds."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastgrpo"


DEMOS = ("fastgrpo.toyworld", "fastgrpo.safety")
COMMANDS = ("fastgrpo.train", "fastgrpo.cli", "fastgrpo.commandline", "fastgrpo.evaluate", "fastgrpo.gradient_snr",
            "fastgrpo.experiments")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE, *, within_packages: bool = False) -> dict[str, set[str]]:
    """{module: the fastgrpo modules it imports}. Without `within_packages`, edges between a package and its own
    submodules (or the packages above a module) are left out."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules}
        # a package's own submodules, and the packages above a module, are not edges of a cycle
        graph[name] = targets if within_packages else {t for t in targets if not t.startswith(name + ".")
                                                       and not name.startswith(t + ".")}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing `start` may import, a package's __init__ counted for each of its submodules."""
    seen, stack = set(), [start]
    while stack:
        for target in graph[stack.pop()]:
            parts = target.split(".")
            for end in range(2, len(parts) + 1):
                name = ".".join(parts[:end])
                if name in graph and name not in seen:
                    seen.add(name)
                    stack.append(name)
    return seen


def inside(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'A -> B' for each core module A that reaches a demo or a command B, and each safety module that reaches a toy
    world or a command."""
    found = []
    for name in sorted(graph):
        if inside(name, ("fastgrpo.toyworld",) + COMMANDS) or name == "fastgrpo":
            continue
        banned = ("fastgrpo.toyworld",) + COMMANDS if inside(name, ("fastgrpo.safety",)) else DEMOS + COMMANDS
        found += [f"{name} -> {target}" for target in sorted(reachable(graph, name))
                  if inside(target, banned) and not inside(target, (name,))]
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components with more than one module."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "fastgrpo.train" in graph["fastgrpo.cli"]  # the graph sees imports inside functions
    assert strongly_connected(graph) == []


def test_layer_finder_sees_loops_through_a_package():
    """models -> toyworld (a package) and toyworld.build -> models: the core reaches the demo."""
    graph = {"fastgrpo.models": {"fastgrpo.toyworld"}, "fastgrpo.toyworld": set(),
             "fastgrpo.toyworld.build": {"fastgrpo.models"}, "fastgrpo.safety.report": {"fastgrpo.plots"},
             "fastgrpo.plots": set(), "fastgrpo.safety": set()}
    assert layer_violations(graph) == ["fastgrpo.models -> fastgrpo.toyworld"]
    graph["fastgrpo.plots"] = {"fastgrpo.toyworld.build"}
    assert layer_violations(graph) == ["fastgrpo.models -> fastgrpo.toyworld",  # models itself is core: no entry
                                       "fastgrpo.plots -> fastgrpo.toyworld", "fastgrpo.plots -> fastgrpo.toyworld.build",
                                       "fastgrpo.safety.report -> fastgrpo.toyworld",
                                       "fastgrpo.safety.report -> fastgrpo.toyworld.build"]


def test_the_core_reaches_no_demo_and_no_command():
    graph = import_graph(within_packages=True)
    assert {"fastgrpo.models", "fastgrpo.reward", "fastgrpo.ops", "fastgrpo.safety.report"} <= set(graph)
    assert "fastgrpo.toyworld.monitor" in reachable(graph, "fastgrpo.cli")  # the command line wires the toy judge in
    assert layer_violations(graph) == []
