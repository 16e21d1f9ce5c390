"""The dependency direction web -> worker -> ml -> configs, checked in fresh interpreters."""
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
