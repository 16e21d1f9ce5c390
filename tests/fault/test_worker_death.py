"""Fault tests: a worker killed mid-job or between taking a message and starting its job, a Redis
restart with queued jobs. No job is lost or run twice."""
from __future__ import annotations

import os
import signal
import time

import pytest
import redis
import requests

from tests.integration.conftest import TINY
from worker.reconcile import queued_in_broker, taken_recently
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


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the Celery worker's pool processes), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_worker_killed_between_taking_a_message_and_starting_its_job_runs_it_once_elsewhere(live_service):
    """The window is held open without a hook in Kiln: the pool process is frozen (SIGSTOP), so the
    worker's main process takes the message from Redis (acks_late: it moves to kombu's unacked hash)
    and hands it on, but nothing leases or starts the job. Then the whole worker is SIGKILLed: its
    message dies with it (only the dead worker's unacknowledged copy is left, which Redis would give
    back after the visibility timeout). The reconciler of a fresh worker sees a queued job whose
    message is neither waiting nor recently taken and sends it again: it runs once, attempts 1."""
    s = live_service
    store = JobStore.from_settings(s.settings)
    client = redis.Redis.from_url(s.settings.redis_client_url)
    pool = children(s.worker.pid)
    assert pool, "the worker has no pool process"
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    try:
        job = s.submit(TINY)
        sent_at = store.get(job["id"])["enqueued_at"]
        deadline = time.monotonic() + 60
        while job["id"] not in taken_recently(client, 3600):
            assert time.monotonic() < deadline, "the worker never took the message"
            time.sleep(0.05)
        row = store.get(job["id"])
        assert (row["status"], row["lease_owner"], row["attempts"]) == ("queued", None, 0), row
    finally:
        s.kill_worker()  # the whole process group, the frozen pool process with it
    assert job["id"] not in queued_in_broker(client)  # gone with the worker: nothing would run it
    s.start_worker()
    done = s.wait(job["id"], timeout=180)
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert [e["to"] for e in store.events(job["id"])] == ["queued", "running", "succeeded"]
    assert store.get(job["id"])["enqueued_at"] > sent_at  # sent again by the reconciler
    assert s.job(job["id"])["status"] == "succeeded"
    client.close()
