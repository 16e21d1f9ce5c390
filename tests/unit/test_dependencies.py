"""ml stays a pure-PyTorch layer: no web/worker stack, and ``import ml`` itself is light."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.conftest import ROOT


def modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


def test_ml_never_imports_the_service_stack():
    loaded = modules_after("import ml, ml.train, ml.evaluate")
    assert not loaded & {"flask", "celery", "sqlalchemy", "redis", "worker", "web"}
    assert "torch" in loaded


def test_import_ml_is_light():
    assert "torch" not in modules_after("import ml")
