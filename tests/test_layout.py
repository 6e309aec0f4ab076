"""The package's shape: no module over MAX_LINES lines, and no import cycle between its modules.

The import graph holds what runs when a module is imported: its module-level imports (class bodies and
`try`/`if` blocks included), not the ones inside functions (they run later, on a call) nor the ones under
`if TYPE_CHECKING:` (they never run; a second test forbids cycles through them too). Importing `pkg.sub`
also runs `pkg/__init__.py` first, but that edge is left out: every package that re-exports its submodules
would otherwise form a cycle with each of them. An explicit import of the package itself
(`from opsd_lightning.pkg import name` in `pkg/sub.py`) is an edge like any other, so it is a cycle exactly
when `pkg/__init__.py` imports `pkg/sub.py` back, directly or not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "opsd_lightning"
MAX_LINES = 400


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `root` (a package is its __init__)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt], type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of `body` that run when the module is imported, and with `type_checking` those
    under `if TYPE_CHECKING:` too."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if type_checking or not _is_type_checking(node.test):
                yield from _module_level_imports(node.body, type_checking)
            yield from _module_level_imports(node.orelse, type_checking)
        elif isinstance(node, ast.ClassDef):
            yield from _module_level_imports(node.body, type_checking)
        elif isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block, type_checking)
        elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.AsyncFor | ast.While):
            yield from _module_level_imports(node.body, type_checking)
            yield from _module_level_imports(getattr(node, "orelse", []), type_checking)


def _imported_modules(
    statement: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: Mapping[str, Path]
) -> Iterator[str]:
    """The modules of `known` that `statement`, written in `module`, imports by name."""
    if isinstance(statement, ast.Import):
        for alias in statement.names:
            # `import a.b.c` imports the deepest of them that is a module of ours.
            parts = alias.name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            yield from [prefix for prefix in prefixes if prefix in known][:1]
        return
    if statement.level:
        package_parts = module.split(".") if is_package else module.split(".")[:-1]
        base = package_parts[: len(package_parts) - statement.level + 1]
        source = ".".join([*base, *([statement.module] if statement.module else [])])
    else:
        source = statement.module or ""
    for alias in statement.names:
        submodule = f"{source}.{alias.name}"
        if submodule in known:
            yield submodule
        elif source in known:
            yield source


def import_graph(root: Path, package: str, type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports at import time (see the module docstring); with
    `type_checking`, also those it imports for annotations only."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = {
            target
            for statement in _module_level_imports(tree.body, type_checking)
            for target in _imported_modules(statement, module, is_package, files)
        }
        graph[module] = targets - {module}
    return graph


def strongly_connected_components(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: every component, each sorted, nodes absent from `graph` included."""
    nodes = sorted(set(graph) | {target for targets in graph.values() for target in targets})
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif successor not in index:
                index[successor] = lowlink[successor] = len(index)
                stack.append(successor)
                on_stack.add(successor)
                work.append((successor, iter(sorted(graph.get(successor, ())))))
            elif successor in on_stack:
                lowlink[node] = min(lowlink[node], index[successor])
    return components


def _cycle_through(start: str, members: set[str], graph: Mapping[str, set[str]]) -> list[str]:
    """One shortest cycle from `start` back to it inside a component, as a path (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, set()) & members):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")


def import_cycles(graph: Mapping[str, set[str]]) -> list[str]:
    """Each cycle of `graph` as `a -> b -> a`, one per strongly connected component."""
    cycles = []
    for component in strongly_connected_components(graph):
        if len(component) > 1 or component[0] in graph.get(component[0], set()):
            path = _cycle_through(component[0], set(component), graph)
            cycles.append(f"{' -> '.join(path)} (component: {', '.join(component)})")
    return cycles


def test_no_module_is_over_the_line_limit() -> None:
    files = module_files(SRC, PACKAGE).values()
    lengths = {path.relative_to(SRC).as_posix(): len(path.read_text().splitlines()) for path in files}
    over = [f"{name}: {lines} lines" for name, lines in sorted(lengths.items()) if lines > MAX_LINES]
    assert not over, f"over {MAX_LINES} lines (split by concept):\n" + "\n".join(over)


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph(SRC, PACKAGE)
    assert (
        "opsd_lightning.contexts.renderer" in graph["opsd_lightning.evaluation.runner"]
    )  # the graph sees imports
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_cycle_even_through_imports_for_annotations() -> None:
    # They never run, but two modules that name each other's types still depend on each other both ways.
    cycles = import_cycles(import_graph(SRC, PACKAGE, type_checking=True))
    assert not cycles, "import cycles through `if TYPE_CHECKING:` imports:\n" + "\n".join(cycles)


def test_cycle_finder_names_a_planted_cycle() -> None:
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert import_cycles(acyclic) == []
    planted = {**acyclic, "c": {"d"}, "d": {"b"}, "e": {"e"}}
    assert import_cycles(planted) == ["b -> c -> d -> b (component: b, c, d)", "e -> e (component: e)"]


def test_graph_counts_a_package_import_only_when_it_closes_a_loop(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.sub import name\nfrom . import other\n")
    (package / "other.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import pkg.sub\n")
    (package / "sub.py").write_text("from .other import x\n\ndef later():\n    from pkg import name\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.sub", "pkg.other"}, "pkg.other": set(), "pkg.sub": {"pkg.other"}}
    assert import_cycles(graph) == []  # the implicit `pkg` of `pkg.sub`, and lazy imports, do not count
    assert import_graph(tmp_path, "pkg", type_checking=True)["pkg.other"] == {"pkg.sub"}

    (package / "sub.py").write_text("from pkg import name\n")
    assert import_cycles(import_graph(tmp_path, "pkg")) == ["pkg -> pkg.sub -> pkg (component: pkg, pkg.sub)"]


def test_the_readme_stays_a_five_minute_read() -> None:
    """The README is for a newcomer: under 300 lines, the details in docs/ (issue 19)."""
    readme = SRC.parent / "README.md"
    assert len(readme.read_text().splitlines()) < 300


# The packages by role (issue 19): entry points in `cli/`, every component in the package of its role. The
# top level keeps only what every package shares.
ROLES = {
    "cli",
    "models",
    "contexts",
    "rollout",
    "environments",
    "teachers",
    "objectives",
    "training",
    "data",
    "evaluation",
    "reporting",
}
TOP_LEVEL_MODULES = {"__init__.py", "_paths.py", "options.py"}


def test_the_package_is_grouped_by_role() -> None:
    package = SRC / PACKAGE
    packages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert packages == ROLES
    assert {p.name for p in package.glob("*.py")} == TOP_LEVEL_MODULES


def test_the_tests_mirror_the_packages() -> None:
    """Each test file sits in the folder of the package it tests; the cross-cutting ones at the top."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if (p / "__init__.py").is_file()} - {"golden"}
    assert folders == ROLES
    for folder in folders:
        assert list((tests / folder).glob("test_*.py")), f"tests/{folder}/ has no tests"
