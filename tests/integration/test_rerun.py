"""`kiln rerun <id>` over HTTP against the real stack: the rerun is the same job (config, manifest's
dataset hash and seed), and on CPU with training.deterministic its per-epoch metrics are identical
to the original's, bit for bit, both for digits (in memory) and for an uploaded dataset read by
DataLoader worker processes (num_workers: auto)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile

import pytest
import requests

from tests.integration.conftest import ROOT, TINY

pytestmark = pytest.mark.integration
TIMING = {"time_s", "images_per_s"}   # wall-clock: the only fields of a row that may differ


def kiln(service, *args) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, pointed at the live service."""
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_URL", "KILN_TOKEN", "KILN_HOME")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "web.client", "--url", service.base_url, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def digits_zip(n: int = 200) -> bytes:
    """sklearn's digits as PNGs in ImageFolder layout, zipped (what a user uploads)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k in range(n):
            png = io.BytesIO()
            Image.fromarray(np.rint(d.images[k] * 255 / 16).astype(np.uint8), "L").save(png, "PNG")
            z.writestr(f"{d.target[k]}/{k}.png", png.getvalue())
    return buf.getvalue()


def get(service, path: str):
    r = requests.get(service.url(path), timeout=30)
    assert r.status_code == 200, r.text
    return r


def rerun_and_compare(s, config: dict, priority: int = 0) -> tuple[dict, dict]:
    r = requests.post(s.url("/v1/jobs"), json={"kind": "train", "config": config, "priority": priority}, timeout=30)
    assert r.status_code == 202, r.text
    first = s.wait(r.json()["id"], timeout=300)
    assert first["status"] == "succeeded", first
    proc = kiln(s, "rerun", first["id"], "--quiet")
    assert proc.returncode == 0, proc.stderr
    new_id = proc.stdout.strip()
    assert len(new_id) == 32 and new_id != first["id"]
    second = s.wait(new_id, timeout=300)
    assert second["status"] == "succeeded", second
    assert second["config"] == first["config"] and second["kind"] == first["kind"]
    assert second["priority"] == first["priority"] == priority

    a, b = (get(s, f"/v1/jobs/{j['id']}/metrics").json() for j in (first, second))
    assert [r["epoch"] for r in a["epochs"]] == list(range(1, config["training"]["epochs"] + 1))
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in a["epochs"]]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in b["epochs"]] == strip   # exact equality
    assert {k: v for k, v in b["series"].items() if k not in TIMING} == \
        {k: v for k, v in a["series"].items() if k not in TIMING}
    assert second["metrics"]["best"] == first["metrics"]["best"]

    m1, m2 = (get(s, f"/v1/jobs/{j['id']}/artifacts/manifest.json").json() for j in (first, second))
    assert m2["dataset"] == m1["dataset"] and m2["seed"] == m1["seed"] and m2["config"] == m1["config"]
    assert m1["environment"]["torch_threads"] == m2["environment"]["torch_threads"]
    names = {x["name"] for x in get(s, f"/v1/jobs/{second['id']}/artifacts").json()["artifacts"]}
    assert "manifest.json" in names
    return {**m1, "job_id": first["id"]}, m2


def first_log(s, manifest: dict) -> str:
    return get(s, f"/v1/jobs/{manifest['job_id']}/logs").text


def test_rerun_of_a_deterministic_digits_job_reproduces_its_metrics(live_service):
    config = {**TINY, "training": {**TINY["training"], "deterministic": True}}
    m1, _ = rerun_and_compare(live_service, config, priority=2)
    assert m1["dataset"]["method"] == "tensors" and m1["deterministic"] is True


def test_rerun_with_loader_workers_on_an_uploaded_dataset_reproduces_its_metrics(live_service):
    s = live_service
    r = requests.post(s.url("/v1/datasets"), files={"file": ("d.zip", digits_zip(), "application/zip")},
                      data={"name": "rerun-digits"}, timeout=120)
    assert r.status_code == 201, r.text
    config = {"data": {"dataset": r.json()["id"], "image_size": 16},
              "training": {"epochs": 2, "batch_size": 32, "deterministic": True}}
    m1, _ = rerun_and_compare(s, config)
    assert m1["dataset"]["method"] == "files" and m1["dataset"]["files"] == 200
    # the user's default num_workers (auto) started loader worker processes for the on-disk images
    workers = re.search(r"torch threads, (\d+) loader workers", first_log(s, m1))
    assert workers and int(workers.group(1)) >= 1, first_log(s, m1)[:2000]


def test_rerun_of_an_unknown_job_is_one_line(live_service):
    proc = kiln(live_service, "rerun", "0" * 32)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("kiln: error: HTTP 404 not_found")


def test_the_rerun_body_carries_kind_config_and_priority():
    from web.client import rerun_body

    job = {"id": "a" * 32, "kind": "train", "config": {"training": {"seed": 3}}, "status": "failed", "priority": 5}
    assert rerun_body(job) == {"kind": "train", "config": {"training": {"seed": 3}}, "priority": 5}
    assert rerun_body({**job, "priority": None}) == {"kind": "train", "config": {"training": {"seed": 3}}}
