"""Retention over HTTP against the real stack (Redis, Celery worker, gunicorn): deletes remove the rows and
the stored objects (looked for in the storage folder), refuse what is in use, and the TTL sweep run by the
worker's reconciler removes an old job's objects.

The service is the usual LiveService with one setting changed: KILN_ARTIFACT_TTL_DAYS=7 (the default
keeps artifacts forever, and then there is no sweep to see). Nothing here finishes more than a day ago
unless the test moves its finished_at back.
"""
from __future__ import annotations

import io
import time
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from tests.integration.conftest import TINY
from tests.integration.test_jobs_http import _digits_zip
from worker import db
from worker.clock import utcnow
from worker.live import LiveService

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    s = LiveService(tmp_path_factory.mktemp("retention") / "var", artifact_ttl_days=7.0)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def stored(s: LiveService, prefix: str) -> list[str]:
    """Files under ``prefix`` in the service's storage folder (what a delete must remove)."""
    root = s.settings.home_path / "storage" / prefix
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def delete(s: LiveService, path: str) -> requests.Response:
    return requests.delete(s.url(path), timeout=60)


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "PNG")
    return buf.getvalue()


def predict(s: LiveService, model: str) -> requests.Response:
    return requests.post(s.url("/predict"), params={"model": model}, files={"image": ("x.png", png(), "image/png")},
                         timeout=120)


def test_deletes_remove_rows_and_objects_and_refuse_what_is_in_use(service):
    s = service
    r = requests.post(s.url("/v1/datasets"), files={"file": ("d.zip", _digits_zip(), "application/zip")},
                      data={"name": "to-delete"}, timeout=60)
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    assert stored(s, f"datasets/{ds}")
    data = {"dataset": ds, "image_size": 16}

    # a job that is queued or running, and the dataset it trains on, are refused
    long = s.submit({"data": data, "training": {"epochs": 200, "batch_size": 16}})
    r = delete(s, f"/v1/jobs/{long['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished", r.text
    r = delete(s, f"/v1/datasets/{ds}")
    assert r.status_code == 409 and r.json()["error"]["details"] == {"jobs": [long["id"]]}, r.text
    s.wait(long["id"], statuses=("running",), timeout=120)
    assert delete(s, f"/v1/jobs/{long['id']}").status_code == 409
    assert requests.post(s.url(f"/v1/jobs/{long['id']}/cancel"), timeout=30).status_code == 200
    assert s.wait(long["id"], timeout=120)["status"] == "cancelled"
    assert "checkpoints/last.pt" in stored(s, f"jobs/{long['id']}")     # the cancel checkpoint was written
    r = delete(s, f"/v1/jobs/{long['id']}")
    assert r.status_code == 200 and r.json()["objects"] >= 3, r.text
    assert stored(s, f"jobs/{long['id']}") == [] and not (s.settings.home_path / "storage/jobs" / long["id"]).exists()
    assert requests.get(s.url(f"/v1/jobs/{long['id']}"), timeout=30).status_code == 404
    assert delete(s, f"/v1/jobs/{long['id']}").status_code == 404

    # a finished job with the keep policy; two versions registered from it
    job = s.wait(s.submit({"data": data, "training": {"epochs": 2, "batch_size": 16, "keep_every": 1}})["id"])
    assert job["status"] == "succeeded", job
    files = stored(s, f"jobs/{job['id']}")
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/epoch-1.pt", "checkpoints/epoch-2.pt",
            "train.log", "metrics.jsonl", "config.yaml"} <= set(files), files
    for _ in range(2):
        r = requests.post(s.url("/v1/models"), json={"name": "kept", "job_id": job["id"]}, timeout=300)
        assert r.status_code == 201, r.text
    r = requests.put(s.url("/v1/models/kept/aliases/production"), json={"version": 1}, timeout=30)
    assert r.status_code == 200, r.text
    assert predict(s, "kept:2").status_code == 200

    r = delete(s, "/v1/models/kept/versions/1")
    assert r.status_code == 409 and r.json()["error"]["details"] == {"aliases": ["production"]}, r.text
    r = delete(s, "/v1/models/kept/versions/2")
    assert r.status_code == 200 and r.json()["objects"] >= 3, r.text
    assert stored(s, "models/kept/2") == [] and stored(s, "models/kept/1")
    time.sleep(s.settings.model_refresh_s + 1)   # the other web process re-resolves its refs within this
    for _ in range(4):                           # both gunicorn processes: the deleted version is not served
        r = predict(s, "kept:2")
        assert r.status_code == 404, r.text
    assert [v["version"] for v in requests.get(s.url("/v1/models/kept"), timeout=30).json()["versions"]] == [1]
    assert delete(s, "/v1/models/kept/versions/2").status_code == 404
    r = requests.post(s.url("/v1/models"), json={"name": "kept", "job_id": job["id"]}, timeout=300)
    assert r.status_code == 201 and r.json()["version"] == 3, r.text   # a deleted number is never reused

    # the job goes; the versions made from it keep their own copy of the weights
    r = delete(s, f"/v1/jobs/{job['id']}")
    assert r.status_code == 200, r.text
    assert stored(s, f"jobs/{job['id']}") == []
    assert requests.get(s.url(f"/v1/jobs/{job['id']}/artifacts"), timeout=30).status_code == 404
    assert predict(s, "kept@production").status_code == 200

    # no job uses the dataset now
    r = delete(s, f"/v1/datasets/{ds}")
    assert r.status_code == 200 and r.json()["objects"] == 120, r.text
    assert stored(s, f"datasets/{ds}") == []
    assert requests.get(s.url(f"/v1/datasets/{ds}"), timeout=30).status_code == 404
    assert delete(s, f"/v1/datasets/{ds}").status_code == 404


def test_the_reconciler_removes_artifacts_of_jobs_finished_longer_ago_than_the_ttl(service):
    s = service
    old = s.wait(s.submit({**TINY, "training": {"epochs": 1, "batch_size": 32}})["id"])
    recent = s.wait(s.submit({**TINY, "training": {"epochs": 1, "batch_size": 32}})["id"])
    assert old["status"] == recent["status"] == "succeeded"
    assert "checkpoints/last.pt" in stored(s, f"jobs/{old['id']}")
    engine = db.make_engine(s.settings)
    with engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.id == old["id"]).values(finished_at=utcnow() - timedelta(days=8)))
    deadline = time.monotonic() + 60           # the worker's reconciler runs every second here
    while stored(s, f"jobs/{old['id']}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stored(s, f"jobs/{old['id']}") == []
    job = requests.get(s.url(f"/v1/jobs/{old['id']}"), timeout=30).json()       # the row stays
    assert job["status"] == "succeeded" and job["metrics"]["best"]["val_accuracy"] is not None
    assert requests.get(s.url(f"/v1/jobs/{old['id']}/artifacts"), timeout=30).json() in ([], {"artifacts": []})
    with engine.connect() as conn:
        reasons = list(conn.execute(sa.select(db.job_events.c.reason).where(
            db.job_events.c.job_id == old["id"])).scalars())
    assert any(r.startswith("artifacts expired") for r in reasons), reasons
    assert "checkpoints/last.pt" in stored(s, f"jobs/{recent['id']}")   # finished a moment ago: kept
