"""The source stays free of copies: no function defined twice, by name in one scope or by body anywhere.

A verbatim second definition once sat in `losses/chunked.py` (the later one silently wins), and a copied body
drifts from its original the first time one of them is fixed. Docstrings and names are ignored when bodies are
compared; bodies too small to be worth sharing (a one-line delegation) are left alone.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "opsd_lightning"
MIN_BODY_NODES = 40  # about three statements of real work


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def _body_without_docstring(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return body


def _is_overload_or_accessor(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """`@overload` stubs and `@x.setter`-style accessors share a name on purpose."""
    for decorator in function.decorator_list:
        name = ast.unparse(decorator)
        if name.endswith("overload") or name.endswith((".setter", ".getter", ".deleter")):
            return True
    return False


def _sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(SRC.parent)): ast.parse(path.read_text()) for path in sorted(SRC.rglob("*.py"))
    }


def test_no_name_is_defined_twice_in_one_scope() -> None:
    repeated = []
    for name, tree in _sources().items():
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
            seen: dict[str, int] = {}
            for node in scope.body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not _is_overload_or_accessor(
                    node
                ):
                    if node.name in seen:
                        repeated.append(
                            f"{name}:{seen[node.name]} and :{node.lineno} both define {node.name}"
                        )
                    seen[node.name] = node.lineno
    assert not repeated, "\n".join(repeated)


def test_no_function_body_is_written_twice() -> None:
    places: dict[str, list[str]] = defaultdict(list)
    for name, tree in _sources().items():
        for function in _functions(tree):
            body = ast.Module(body=_body_without_docstring(function), type_ignores=[])
            if sum(1 for _ in ast.walk(body)) < MIN_BODY_NODES:
                continue
            places[ast.dump(body)].append(f"{name}:{function.lineno} ({function.name})")
    copies = [" = ".join(where) for where in places.values() if len(where) > 1]
    assert not copies, "the same function body in several places:\n" + "\n".join(copies)


def test_the_checks_find_a_planted_copy() -> None:
    """The body comparison sees through a new name and a new docstring."""
    source = (
        "def a(x):\n    '''one'''\n    y = [i * 2 for i in range(x) if i % 3]\n    z = sum(y) + len(y) * x\n"
        "    return {'y': y, 'z': z, 'w': [v - z for v in y]}\n"
        "def b(x):\n    '''two'''\n    y = [i * 2 for i in range(x) if i % 3]\n    z = sum(y) + len(y) * x\n"
        "    return {'y': y, 'z': z, 'w': [v - z for v in y]}\n"
    )
    bodies = [
        ast.Module(body=_body_without_docstring(f), type_ignores=[]) for f in _functions(ast.parse(source))
    ]
    assert ast.dump(bodies[0]) == ast.dump(bodies[1])
    assert sum(1 for _ in ast.walk(bodies[0])) >= MIN_BODY_NODES  # big enough to be compared
