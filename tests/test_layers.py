"""The dependency direction web -> worker -> ml -> configs (fresh interpreters and source), and no import cycles."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_after(module: str) -> set[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(out.stdout)}


@pytest.mark.parametrize("module, forbidden", [
    ("configs", {"torch", "flask", "celery", "sqlalchemy", "ml", "worker", "web"}),
    ("ml.train", {"flask", "celery", "sqlalchemy", "redis", "worker", "web"}),
    ("ml.inference", {"flask", "celery", "sqlalchemy", "redis", "worker", "web"}),
    ("worker.service", {"flask", "web", "torch"}),
    ("worker.celery_main", {"flask", "web"}),
    ("web", {"torch"}),
])
def test_layer_imports_only_what_is_below(module, forbidden):
    loaded = imported_after(module)
    assert not (loaded & forbidden), f"{module} pulled in {sorted(loaded & forbidden)}"


def test_no_layer_imports_upward_in_source():
    """A static check too: a lazy import inside a function would escape the runtime check."""
    below = {"configs": {"ml", "worker", "web"}, "ml": {"worker", "web", "flask", "celery"},
             "worker": {"web", "flask"}}
    offenders = []
    for package, banned in below.items():
        for path in (ROOT / package).rglob("*.py"):
            for line in path.read_text().splitlines():
                words = line.strip().split()
                if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in banned:
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders


# ------------------------------------------------------------------ import cycles
PACKAGES = ("configs", "ml", "worker", "web")


def project_modules() -> dict[str, Path]:
    """Every module of the four packages: dotted name -> file."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level or inside functions)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute path
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of project modules that import each other (Tarjan)."""
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(groups)


def test_no_import_cycles_among_project_modules():
    """Two modules that import each other, even inside functions, are one module or a missing third."""
    cycles = import_cycles()
    assert not cycles, "import cycles:\n  " + "\n  ".join(" <-> ".join(group) for group in cycles)


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    """The checker itself: a cycle made only of function-level imports is found."""
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("def g():\n    import a\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert imports_of("a", modules["a"], modules) == {"b"} and imports_of("b", modules["b"], modules) == {"a"}


def test_bench_does_not_import_tests():
    """Benchmarks share code with the tests through the packages (worker.live), never through tests/."""
    offenders = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in sorted((ROOT / "bench").glob("*.py"))
                 for line in p.read_text().splitlines()
                 if line.strip().startswith(("from tests", "import tests"))]
    assert not offenders, offenders
