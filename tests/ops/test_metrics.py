"""/metrics: the families exist, parse, and their counts move."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
def client(settings):
    from worker.db import migrate
    from web import create_app

    migrate(settings)
    app = create_app(settings)
    app.config["TESTING"] = True
    web_metrics.SCRAPE_CACHE_S = 0.0  # see every change at once
    yield app.test_client()
    web_metrics.SCRAPE_CACHE_S = 5.0
    app.extensions["kiln"].close()


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

    monkeypatch.setattr(kiln, "list_jobs", broken)
    monkeypatch.setattr(kiln, "job_counts", broken, raising=False)
    families = scrape(client)
    assert sample(families, "kiln_store_up", "kiln_store_up") == 0.0
    assert "kiln_http_requests" in families


def test_collect_service_from_job_dicts():
    """Durations per kind and heartbeat age per worker come from the newest jobs."""
    class Fake:
        def job_counts(self):
            return {"queued": 2, "running": 1}

        def list_jobs(self, status=None, kind=None, limit=50, offset=0):
            jobs = [{"kind": "train", "status": "succeeded", "started_at": "2026-01-01T00:00:00Z",
                     "finished_at": "2026-01-01T00:00:30Z", "worker": "a", "heartbeat_at": "2026-01-01T00:00:29Z"},
                    {"kind": "train", "status": "running", "started_at": "2026-01-01T00:00:00Z",
                     "finished_at": None, "worker": "b", "heartbeat_at": "2099-01-01T00:00:00Z"}]
            return {"jobs": jobs, "total": len(jobs)}

    fams = {f.name: f for f in web_metrics.collect_service(Fake())}
    assert {s.labels["state"]: s.value for s in fams["kiln_jobs"].samples}["queued"] == 2
    assert fams["kiln_queue_depth"].samples[0].value == 2
    buckets = {s.labels["le"]: s.value for s in fams["kiln_job_duration_seconds"].samples if "le" in s.labels}
    assert buckets["15"] == 0 and buckets["30"] == 1 and buckets["+Inf"] == 1
    ages = {s.labels["worker"]: s.value for s in fams["kiln_worker_heartbeat_age_seconds"].samples}
    assert ages["a"] > 3600 and ages["b"] == 0.0


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
