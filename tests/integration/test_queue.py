"""A queue people can reason about, over HTTP against the real stack (Redis, one Celery worker with
one slot, gunicorn): priorities reorder a queue behind a busy worker, queue positions and reasons,
Idempotency-Key on submit, and a cancelled job retried in place resumes from its checkpoint."""
from __future__ import annotations

import json
import time

import pytest
import requests

from tests.integration.conftest import TINY

pytestmark = pytest.mark.integration
LONG = {**TINY, "training": {**TINY["training"], "epochs": 200}}  # keeps the only worker slot busy


def post(s, path: str, **kw) -> requests.Response:
    return requests.post(s.url(path), timeout=60, **kw)


def events(s, job_id: str) -> list[dict]:
    """The job's state changes, read from the store the service writes."""
    return s_kiln(s).job_events(job_id)


def s_kiln(s):
    from worker.service import Kiln

    return Kiln(s.settings)


def wait_running(s, job_id: str, timeout: float = 120) -> dict:
    return s.wait(job_id, statuses=("running",), timeout=timeout)


def test_priorities_reorder_the_queue_behind_a_busy_worker(live_service):
    s = live_service
    blocker = s.submit(LONG)
    wait_running(s, blocker["id"])
    low = post(s, "/v1/jobs", json={"kind": "train", "config": TINY}).json()
    high = post(s, "/v1/jobs", json={"kind": "train", "config": TINY, "priority": 7}).json()
    assert (low["priority"], high["priority"]) == (0, 7)
    # positions while the worker is busy: the later, higher-priority job is next
    low_now, high_now = s.job(low["id"]), s.job(high["id"])
    assert low_now["status"] == high_now["status"] == "queued"
    assert high_now["queue"] == {"position": 1, "reason": "next in line; waiting for a free worker"}
    assert low_now["queue"] == {"position": 2, "reason": "1 job ahead"}
    page = {j["id"]: j for j in requests.get(s.url("/v1/jobs"), params={"status": "queued"}, timeout=30).json()["jobs"]}
    assert page[high["id"]]["queue"]["position"] == 1 and page[low["id"]]["queue"]["position"] == 2
    assert s.job(blocker["id"])["queue"] == {"position": None, "reason": None}

    assert post(s, f"/v1/jobs/{blocker['id']}/cancel").status_code == 200
    assert s.wait(blocker["id"], timeout=120)["status"] == "cancelled"
    done_high = s.wait(high["id"], timeout=300)
    done_low = s.wait(low["id"], timeout=300)
    assert done_high["status"] == done_low["status"] == "succeeded", s.worker_log()[-3000:]
    assert done_high["started_at"] < done_low["started_at"]  # the high one started first
    assert done_high["finished_at"] <= done_low["started_at"]  # one slot: one after the other


def test_an_idempotent_retry_of_submit_returns_the_same_job(live_service):
    s = live_service
    body = {"kind": "train", "config": {**TINY, "training": {**TINY["training"], "epochs": 1}}}
    first = post(s, "/v1/jobs", json=body, headers={"Idempotency-Key": "nightly-2026-11-29"})
    again = post(s, "/v1/jobs", json=body, headers={"Idempotency-Key": "nightly-2026-11-29"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = post(s, "/v1/jobs", json={**body, "priority": 3}, headers={"Idempotency-Key": "nightly-2026-11-29"})
    assert other.status_code == 409 and "nightly-2026-11-29" in other.json()["error"]["message"]
    jobs = requests.get(s.url("/v1/jobs"), params={"limit": 200}, timeout=30).json()["jobs"]
    assert sum(1 for j in jobs if j["id"] == first.json()["id"]) == 1
    assert s.wait(first.json()["id"], timeout=300)["status"] == "succeeded"


def test_a_cancelled_job_retried_in_place_resumes_from_its_checkpoint(live_service):
    s = live_service
    config = {**TINY, "training": {**TINY["training"], "epochs": 6}}
    job = s.submit(config)
    deadline = time.monotonic() + 300
    while (s.job(job["id"])["progress"]["epoch"] or 0) < 2:  # two epochs done and checkpointed
        assert time.monotonic() < deadline, s.worker_log()[-3000:]
        assert s.job(job["id"])["status"] in ("queued", "running")
        time.sleep(0.2)
    assert post(s, f"/v1/jobs/{job['id']}/cancel").status_code == 200
    cancelled = s.wait(job["id"], timeout=120)
    assert cancelled["status"] == "cancelled" and cancelled["attempts"] == 1
    reached = cancelled["progress"]["epoch"]
    assert reached >= 2

    r = post(s, f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == job["id"] and r.json()["status"] in ("queued", "running")
    done = s.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", s.worker_log()[-3000:]
    assert done["attempts"] == 2 and done["progress"]["epoch"] == 6

    log = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    resumed = [line for line in log.splitlines() if "resuming from checkpoint at epoch" in line]
    assert resumed, log[-3000:]
    assert int(resumed[-1].split("resuming from checkpoint at epoch")[1].split()[0]) >= reached - 1
    raw = requests.get(s.url(f"/v1/jobs/{job['id']}/artifacts/metrics.jsonl"), timeout=30).text
    epochs = [row["epoch"] for row in map(json.loads, raw.splitlines())
              if row.get("type", "epoch") == "epoch" and "epoch" in row]
    assert epochs.count(1) == 1 and epochs.count(2) == 1  # the first epochs were not trained again
    assert sorted(set(epochs)) == [1, 2, 3, 4, 5, 6]
    trail = [(e["from"], e["to"]) for e in events(s, job["id"])]
    assert ("cancelled", "queued") in trail and trail[-1] == ("running", "succeeded")
    assert any("retried by user; resumes from checkpoints/last.pt" in e["reason"] for e in events(s, job["id"]))
    # a succeeded job is not retried
    again = post(s, f"/v1/jobs/{job['id']}/retry")
    assert again.status_code == 409 and "succeeded" in again.json()["error"]["message"]
