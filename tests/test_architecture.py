"""ARCHITECTURE.md's import rules, kept true: every `ryla` import in src/ (lazy ones inside
functions included) goes where the table allows, and no module imports one that imports it
back, directly or around a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"


def allowed_imports(architecture: str) -> dict[str, set[str]]:
    """package -> packages it may import, from the table under 'Who may import whom'."""
    section = architecture.split("## Who may import whom", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`ryla"):
            continue
        (package,) = re.findall(r"`([\w.]+)`", cells[0])
        rules[package] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return rules


def module_name(path: Path, source: Path) -> str:
    parts = list(path.relative_to(source).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(source: Path) -> dict[str, set[str]]:
    """module -> the ryla modules it imports anywhere in its code. `from a.b import c` counts as
    importing a.b.c where that is a module, else a.b; relative imports are resolved."""
    modules = {module_name(path, source): path for path in source.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for item in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(item, ast.Import):
                targets = [alias.name for alias in item.names]
            elif isinstance(item, ast.ImportFrom):
                base = item.module or ""
                if item.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - item.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in item.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def owner(module: str, packages) -> str | None:
    """The table's package that holds `module` (the longest matching name)."""
    matches = [p for p in packages if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def layer_violations(graph: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        source_package = owner(module, rules)
        if source_package is None:
            if module != "ryla":
                problems.append(f"{module} belongs to no package of ARCHITECTURE.md's table")
            continue
        for target in sorted(imported):
            target_package = owner(target, rules)
            if target == "ryla" or target_package == source_package:  # the root holds only __version__
                continue
            if target_package is None:
                problems.append(f"{module} imports {target}, which belongs to no package of the table")
                continue
            if target_package not in rules[source_package]:
                problems.append(f"{module} imports {target}: {source_package} may not import {target_package}")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_every_import_follows_architecture_md():
    rules = allowed_imports((ROOT / "ARCHITECTURE.md").read_text())
    assert {"ryla.speed", "ryla.flux", "ryla.models", "ryla.api", "ryla.cli"} <= set(rules)
    assert layer_violations(import_graph(SOURCE), rules) == []


def test_no_module_imports_one_that_imports_it_back():
    assert circles(import_graph(SOURCE)) == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The same checks on a made-up package: speed -> flux is upward, and a <-> b is a circle,
    also when the import back is lazy (inside a function)."""
    package = tmp_path / "ryla"
    (package / "speed").mkdir(parents=True)
    (package / "flux").mkdir()
    for folder in (package, package / "speed", package / "flux"):
        (folder / "__init__.py").write_text("")
    (package / "speed" / "a.py").write_text("from ryla.speed import b\n")
    (package / "speed" / "b.py").write_text("def late():\n    from . import a\n")
    (package / "speed" / "c.py").write_text("import ryla.flux.engine\n")
    (package / "flux" / "engine.py").write_text("from ryla.speed.a import thing\n")
    graph = import_graph(tmp_path)
    assert graph["ryla.speed.b"] == {"ryla.speed.a"}
    assert circles(graph) == [["ryla.speed.a", "ryla.speed.b"]]
    rules = allowed_imports("## Who may import whom\n| package | owns | may import |\n|---|---|---|\n"
                            "| `ryla.speed` | speed | |\n| `ryla.flux` | engine | `ryla.speed` |\n")
    assert layer_violations(graph, rules) == [
        "ryla.speed.c imports ryla.flux.engine: ryla.speed may not import ryla.flux"]
