"""Fault tests: a worker killed mid-job, a Redis restart with queued jobs. No job is lost or run twice."""
from __future__ import annotations

import time

import pytest
import requests

from tests.integration.conftest import TINY
from worker.store import JobStore

pytestmark = pytest.mark.integration


def test_killed_worker_job_resumes_from_checkpoint_on_a_new_worker(live_service):
    s = live_service
    # slow enough to be killed mid-training: epochs of ~0.5 s each, a checkpoint after every epoch
    cfg = {**TINY, "data": {**TINY["data"], "subset": 400},
           "training": {**TINY["training"], "epochs": 8, "batch_size": 8}}
    job = s.submit(cfg)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        j = s.job(job["id"])
        if j["status"] == "running" and (j["progress"]["epoch"] or 0) >= 3:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"job never reached epoch 3: {s.job(job['id'])}")
    s.kill_worker()
    assert s.job(job["id"])["status"] == "running"  # nobody has noticed yet
    s.start_worker()
    done = s.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    log = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert "resuming from checkpoint at epoch" in log
    resumed = int(log.split("resuming from checkpoint at epoch ")[1].split()[0])
    assert resumed >= 1
    events = JobStore.from_settings(s.settings).events(job["id"])
    assert [e["to"] for e in events] == ["queued", "running", "queued", "running", "succeeded"]
    assert "lost" in events[2]["reason"]


def test_redis_restart_keeps_queued_jobs(live_service):
    s = live_service
    long = {**TINY, "training": {**TINY["training"], "epochs": 4}}
    ids = [s.submit(long)["id"] for _ in range(4)]
    s.restart_redis()
    for job_id in ids:
        done = s.wait(job_id, timeout=240)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
