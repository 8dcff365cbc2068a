"""The package's shape, read statically: small modules that say their concern, imports that form layers (no cycles),
Ray only in the edge modules, and every document the code cites present in the repository."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "csl_ray"
RAY_EDGE = {
    "csl_ray.data.corrupt_log",
    "csl_ray.data.executor_tuning",
    "csl_ray.data.ray_datasets",
    "csl_ray.monitor",
    "csl_ray.ray_session",
    "csl_ray.resume",
    "csl_ray.train",
    "csl_ray.tune",
}
"""The modules that may import Ray (README, How the code is laid out); everything else is tested and read without it."""
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def imports(name: str) -> frozenset[str]:
    """Every module `name` imports, at any depth of its code (a lazy import inside a function counts)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from csl_ray.data import views` imports the module csl_ray.data.views
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return frozenset(found)


def package_imports(name: str) -> set[str]:
    return {m for m in imports(name) if m in MODULES and m != name}


def test_the_static_reading_sees_the_package():
    # Guards the test itself: a parser that found nothing would pass every check below.
    assert {"csl_ray.selection", "csl_ray.train", "csl_ray.data.views"} <= set(MODULES)
    assert "csl_ray.selection" in package_imports("csl_ray.loop") | {
        m for d in package_imports("csl_ray.loop") for m in package_imports(d)
    }
    assert "ray" in {m.split(".")[0] for m in imports("csl_ray.train")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_is_small_and_states_its_concern(name):
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= MAX_LINES, f"{MODULES[name]}: over {MAX_LINES} lines"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and len(docstring.split()) >= 5, f"{MODULES[name]}: no module docstring stating its concern"


def test_package_imports_have_no_cycles():
    graph = {name: package_imports(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"  # the open modules are exactly those on `path`
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(set(MODULES) - RAY_EDGE))
def test_the_core_never_reaches_ray(name):
    """Neither the module nor anything of the package it imports, transitively, imports Ray or an edge module."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        assert current not in RAY_EDGE, f"{name} reaches the Ray edge module {current}"
        ray = sorted(m for m in imports(current) if m == "ray" or m.startswith("ray."))
        assert not ray, f"{name} reaches Ray through {current}: {ray}"
        todo.extend(package_imports(current))


def test_every_cited_document_exists():
    cited = set()
    for path in (p for folder in ("csl_ray", "jobs", "benchmarks", "tests") for p in (REPO / folder).rglob("*.py")):
        cited.update((path, m) for m in re.findall(r"\b((?:docs|benchmarks)/[\w./-]+\.md)\b", path.read_text()))
    assert any(doc == "docs/method.md" for _, doc in cited)
    missing = [f"{path.relative_to(REPO)} cites {doc}" for path, doc in sorted(cited) if not (REPO / doc).is_file()]
    assert not missing, missing
