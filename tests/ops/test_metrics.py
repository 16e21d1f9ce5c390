"""/metrics: the families exist, parse, and their counts move."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import running_app
from web import metrics as web_metrics

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {"kiln_http_requests", "kiln_http_request_duration_seconds", "kiln_predict_batch_size",
            "kiln_predict_queue_wait_seconds", "kiln_jobs", "kiln_queue_depth", "kiln_job_duration_seconds",
            "kiln_worker_heartbeat_age_seconds", "kiln_store_up"}


def scrape(client) -> dict:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    return {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}


def sample(families, family, name, **labels) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


@pytest.fixture
def metrics_settings(settings, redis_server):
    """A migrated SQLite store and a real Redis (no Celery worker: submitted jobs wait in its queue)."""
    from worker.db import migrate

    s = dataclasses.replace(settings, redis_url=redis_server.url)
    migrate(s)
    return s


@pytest.fixture
def client(metrics_settings, monkeypatch):
    monkeypatch.setattr(web_metrics, "SCRAPE_CACHE_S", 0.0)  # see every change at once
    with running_app(metrics_settings) as app:
        yield app.test_client()


def test_families_parse_and_counts_move(client):
    before = scrape(client)
    assert FAMILIES <= set(before) | {"kiln_worker_heartbeat_age_seconds"}, sorted(set(before))
    assert {s.labels["state"] for s in before["kiln_jobs"].samples} >= {"queued", "running", "succeeded"}
    assert sample(before, "kiln_store_up", "kiln_store_up") == 1.0

    route = "/v1/jobs/<job_id>"
    n404 = sample(before, "kiln_http_requests", "kiln_http_requests_total", route=route, status="404")
    for _ in range(3):
        assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    client.get("/no/such/page")
    web_metrics.observe_batch(4, 0.002)
    web_metrics.observe_batch(1, 0.0)

    after = scrape(client)
    # by URL rule, not raw path: three different ids would be one series
    assert sample(after, "kiln_http_requests", "kiln_http_requests_total", route=route, status="404") == n404 + 3
    assert sample(after, "kiln_http_requests", "kiln_http_requests_total", route="<unmatched>", status="404") >= 1
    count = "kiln_http_request_duration_seconds_count"
    assert (sample(after, "kiln_http_request_duration_seconds", count, route=route)
            - sample(before, "kiln_http_request_duration_seconds", count, route=route)) == 3
    assert (sample(after, "kiln_predict_batch_size", "kiln_predict_batch_size_count")
            - sample(before, "kiln_predict_batch_size", "kiln_predict_batch_size_count")) == 2
    assert (sample(after, "kiln_predict_batch_size", "kiln_predict_batch_size_sum")
            - sample(before, "kiln_predict_batch_size", "kiln_predict_batch_size_sum")) == 5
    assert (sample(after, "kiln_predict_queue_wait_seconds", "kiln_predict_queue_wait_seconds_count")
            - sample(before, "kiln_predict_queue_wait_seconds", "kiln_predict_queue_wait_seconds_count")) == 2


def test_a_down_store_does_not_break_the_scrape(client, monkeypatch):
    kiln = client.application.extensions["kiln"]

    def broken(*a, **k):
        raise RuntimeError("store is down")

    monkeypatch.setattr(kiln, "job_counts", broken)
    families = scrape(client)
    assert sample(families, "kiln_store_up", "kiln_store_up") == 0.0
    assert "kiln_http_requests" in families


def test_service_families_come_from_the_store_and_the_broker(client):
    """Counts per state, the broker's queue, durations per kind and heartbeat ages, from real rows."""
    from tests.api.conftest import TRAIN
    from worker import db
    from worker.clock import utcnow

    kiln = client.application.extensions["kiln"]
    store, now = kiln.store, utcnow()
    depth_before = kiln.queue_depth()
    kiln.submit_job("train", TRAIN)  # stored, then sent: its message waits in Redis (no worker here)
    ran = store.create("predict", {})
    assert store.acquire_lease(ran["id"], "o1", 60) and store.start(ran["id"], "o1", "gpu-a")
    assert store.finish(ran["id"], "o1", "succeeded", "done")
    running = store.create("train", {})
    assert store.acquire_lease(running["id"], "o2", 60) and store.start(running["id"], "o2", "gpu-b")
    with store.engine.begin() as conn:  # a 20 s run whose worker was last heard of an hour ago
        conn.execute(db.jobs.update().where(db.jobs.c.id == ran["id"]).values(
            started_at=now - timedelta(seconds=20), finished_at=now, heartbeat_at=now - timedelta(hours=1)))

    families = scrape(client)
    states = {s.labels["state"]: s.value for s in families["kiln_jobs"].samples}
    assert states == {"queued": 1, "running": 1, "cancelling": 0, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert sample(families, "kiln_queue_depth", "kiln_queue_depth") == depth_before + 1
    buckets = {s.labels["le"]: s.value for s in families["kiln_job_duration_seconds"].samples
               if s.labels.get("kind") == "predict" and "le" in s.labels}
    assert buckets["15"] == 0 and buckets["30"] == 1 and buckets["+Inf"] == 1
    ages = {s.labels["worker"]: s.value for s in families["kiln_worker_heartbeat_age_seconds"].samples}
    assert set(ages) == {"gpu-a", "gpu-b"}
    assert 3600 <= ages["gpu-a"] < 3700 and ages["gpu-b"] < 60


def test_queue_depth_is_absent_while_the_broker_is_down(metrics_settings, tmp_path, monkeypatch):
    monkeypatch.setattr(web_metrics, "SCRAPE_CACHE_S", 0.0)
    down = dataclasses.replace(metrics_settings, redis_url=f"unix://{tmp_path}/no-redis.sock")
    with running_app(down) as app:
        families = scrape(app.test_client())
    assert "kiln_queue_depth" not in families and sample(families, "kiln_store_up", "kiln_store_up") == 1.0


SNIPPET = """
import json, sys
from configs import Settings
from worker.db import migrate
from web import create_app
s = Settings.for_home(sys.argv[1], auth_enabled=False)
migrate(s)
app = create_app(s)
c = app.test_client()
for _ in range(int(sys.argv[2])):
    c.get("/health")
print(json.dumps(c.get("/metrics").get_data(as_text=True)))
app.extensions["kiln"].close()
"""


def test_multiprocess_mode_sums_processes(tmp_path):
    """Two processes writing to one PROMETHEUS_MULTIPROC_DIR: the scrape sums their counts."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}

    def run(n: int) -> dict:
        out = subprocess.run([sys.executable, "-c", SNIPPET, str(tmp_path / "var"), str(n)], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        text = json.loads(out.stdout.strip().splitlines()[-1])
        return {f.name: f for f in text_string_to_metric_families(text)}

    run(2)
    families = run(3)
    assert sample(families, "kiln_http_requests", "kiln_http_requests_total", route="/health", status="200") == 5
    assert "kiln_jobs" in families
    assert list(mp.glob("*.db")), "multiprocess mode wrote no files"
