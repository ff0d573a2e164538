"""No import circles inside ml_serving/ and bench/: every import statement, parsed with ast."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ml_serving", "bench")

Graph = dict[str, dict[str, int]]
"""Module -> the in-tree modules it imports -> the line of the first such import."""


def _modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _base(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if node.level == 0:
        return node.module
    # Relative to the package: a package's __init__ is its own package, a module's its parent.
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if node.level - 1 > len(package):
        return None
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def _targets(module: str, path: Path, modules: Mapping[str, Path]) -> dict[str, int]:
    """The in-tree modules one file imports, at any level (module, function, class, if-blocks:
    ``TYPE_CHECKING`` ones too, since mypy follows them), with the first line of each."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        # `import a.b.c` of a name that is no file here (a third-party module) adds nothing.
        if name is not None and name in modules and name != module:
            edges.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            if base is None:
                continue
            for alias in node.names:
                # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg.
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
    return edges


def import_graph(root: Path, packages: Iterable[str]) -> Graph:
    """Every in-tree import edge of the packages under ``root``."""
    modules = _modules(root, packages)
    return {name: _targets(name, path, modules) for name, path in modules.items()}


def _components(graph: Graph) -> list[list[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


def _shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest circle through the component's first module, as the list of modules."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start} in {component}")  # not a component then


def cycles(graph: Graph) -> list[str]:
    """Each import circle, named as ``a (line 3) -> b (line 9) -> a``: one per component."""
    named = []
    for component in sorted(_components(graph)):
        if len(component) < 2:
            continue  # a module never imports itself here: `add` drops such edges
        path = _shortest_cycle(graph, component)
        hops = [f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:], strict=False)]
        named.append(" -> ".join([*hops, path[0]]))
    return named


def test_ml_serving_and_bench_have_no_import_circle() -> None:
    graph = import_graph(REPO, PACKAGES)
    found = cycles(graph)
    assert not found, "import circles (imports must go one way):\n" + "\n".join(found)


def test_the_graph_sees_the_real_tree() -> None:
    # A parser that found nothing would pass the test above for nothing: pin edges that exist.
    graph = import_graph(REPO, PACKAGES)
    assert "ml_serving.scoring.registry" in graph["ml_serving.scoring.shadow"]
    assert "ml_serving.scoring.model" in graph["ml_serving.scoring.registry"]
    assert "bench.scenarios" in graph["bench.runner"]
    assert len(graph) > 50


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_circle_through_a_function_level_import_is_named(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": '"""p."""\n',
            "pkg/a.py": '"""a."""\nfrom pkg import b\n',
            "pkg/b.py": '"""b."""\nimport os\n\n\ndef f():\n    import pkg.c\n',
            "pkg/c.py": '"""c."""\nfrom . import a\n',
            "pkg/d.py": '"""d, outside the circle."""\nfrom pkg.a import x\n',
        },
    )
    assert cycles(import_graph(tmp_path, ["pkg"])) == [
        "pkg.a (line 2) -> pkg.b (line 6) -> pkg.c (line 2) -> pkg.a"
    ]


def test_circles_through_relative_imports_type_checking_and_init_are_named(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        {
            "top/__init__.py": "",
            "top/sub/__init__.py": "from .x import name\n",
            "top/sub/x.py": "from ..y import other\n",
            "top/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import top.sub\n",
            "two/__init__.py": "",
            "two/p.py": "import two.q\n",
            "two/q.py": "class K:\n    def m(self):\n        from two import p\n",
        },
    )
    assert cycles(import_graph(tmp_path, ["top", "two"])) == [
        "top.sub (line 1) -> top.sub.x (line 1) -> top.y (line 3) -> top.sub",
        "two.p (line 1) -> two.q (line 3) -> two.p",
    ]


def test_no_circle_no_names(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\nimport pkg.c\n",
            "pkg/b.py": "from pkg.c import z\n",
            "pkg/c.py": "import json\nfrom pkg import c\n",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b": 1, "pkg.c": 2}
    assert cycles(graph) == []
