"""Serving is split by process: only the forward process imports torch, statically and at runtime.

The static check reads every import under web/, those inside functions included; the
runtime check registers a model and answers /predict in a fresh interpreter, then
looks at what that web process imported.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

from tests.serving.conftest import png

ROOT = Path(__file__).resolve().parents[2]
FORWARD_PROCESS = "web.serving.forward_process"
FORWARD_SIDE = "web.serving.forward_"  # modules named so run in the forward process (forward_process imports them)
TORCH_SIDE = ("torch", "torchvision", "onnxruntime", "ml.inference", "ml.runtimes", FORWARD_PROCESS,
              "web.serving.forward_models")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every ``from module import name`` in ``path``, (module, None) for every
    ``import module``: anywhere in the file, inside functions too."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.extend((node.module, alias.name) for alias in node.names)
    return out


def web_modules() -> dict[str, list[tuple[str, str | None]]]:
    found = {module_name(p): imports(p) for p in sorted((ROOT / "web").rglob("*.py"))}
    assert FORWARD_PROCESS in found and len(found) > 10, sorted(found)
    return found


def is_torch_side(name: str) -> bool:
    return any(name == banned or name.startswith(banned + ".") for banned in TORCH_SIDE)


def torch_side(found: list[tuple[str, str | None]]) -> set[str]:
    names = {module for module, _ in found} | {f"{module}.{name}" for module, name in found if name}
    return {name for name in names if is_torch_side(name)}


def test_only_the_forward_process_imports_torch():
    modules = web_modules()
    offenders = {module: sorted(torch_side(found)) for module, found in modules.items()
                 if not module.startswith(FORWARD_SIDE)}
    assert not {m: n for m, n in offenders.items() if n}, offenders
    assert {"torch", "web.serving.forward_models"} <= torch_side(modules[FORWARD_PROCESS])  # it sees what it seeks
    assert {"ml.inference", "ml.runtimes"} <= torch_side(modules["web.serving.forward_models"])


def test_web_modules_import_each_other_without_cycles():
    modules = web_modules()
    graph: dict[str, set[str]] = {}
    for module, found in modules.items():  # ``from web import schemas`` is an edge to web.schemas, not web
        targets = {f"{m}.{n}" if f"{m}.{n}" in modules else m for m, n in found}
        graph[module] = {t for t in targets if t in modules} - {module}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for name in sorted(graph[module]):
            visit(name, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_registering_and_predicting_never_import_torch_in_the_web_process(serve_settings, registered,
                                                                          succeeded_job, tmp_path):
    """POST /v1/models then /predict on the new version in a fresh interpreter: no torch module loaded."""
    (tmp_path / "x.png").write_bytes(png(Image.new("L", (8, 8), 128)))
    script = textwrap.dedent(f'''
        import dataclasses, sys
        from configs import Settings
        from web import create_app
        settings = dataclasses.replace(Settings.for_home({str(serve_settings.home)!r}), auth_enabled=False,
                                       forward_workers=1, forward_socket={serve_settings.forward_socket!r})
        app = create_app(settings)
        client = app.test_client()
        r = client.post("/v1/models", json={{"name": "fresh", "job_id": {succeeded_job!r}}})
        assert r.status_code == 201, r.get_data(as_text=True)
        assert r.get_json()["version"] == 1, r.get_json()
        body = open({str(tmp_path / "x.png")!r}, "rb").read()
        for ref in ("fresh:1", "digits@production"):
            r = client.post("/predict?model=" + ref, data=body, content_type="image/png")
            assert r.status_code == 200, r.get_data(as_text=True)
        app.extensions["kiln.serving"].close()
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnxruntime") or
                     m in ("ml.inference", "ml.runtimes") or m.startswith({FORWARD_SIDE!r})))
    ''')
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
