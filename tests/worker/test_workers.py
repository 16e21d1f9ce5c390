"""Workers advertise themselves (worker.workers), GET /v1/workers lists them, and a submit that asks
for more GPUs than the largest live worker has is refused with 422 naming training.processes."""
from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import running_app
from worker import db, workers
from worker.clock import utcnow
from worker.errors import InvalidInput
from worker.workers import Advertiser, advertise, check_fits, list_workers


def train(processes, device="auto", batch_size=64):
    return {"training": {"processes": processes, "device": device, "batch_size": batch_size}}


def age(engine, name, seconds):
    with engine.begin() as conn:
        conn.execute(db.workers.update().where(db.workers.c.name == name)
                     .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_advertise_inserts_then_refreshes_and_list_says_who_is_live(store):
    engine = store.engine
    advertise(engine, "gpu-node-1", hostname="h1", gpus=4, free_gpus=4, slots=4, info={"gpu_ids": ["0", "1"]})
    advertise(engine, "gpu-node-1", hostname="h1", gpus=4, free_gpus=1, slots=4)
    advertise(engine, "cpu-node", hostname="h2", gpus=0, free_gpus=0, slots=1)
    age(engine, "cpu-node", 3600)
    rows = list_workers(engine, 120)
    assert [(w["name"], w["gpus"], w["free_gpus"], w["slots"], w["live"]) for w in rows] == [
        ("cpu-node", 0, 0, 1, False), ("gpu-node-1", 4, 1, 4, True)]
    assert rows[1]["heartbeat_at"].endswith("Z") and rows[1]["hostname"] == "h1"
    workers.forget(engine, "gpu-node-1")
    assert [w["name"] for w in list_workers(engine, 120)] == ["cpu-node"]


def test_advertiser_thread_beats_and_removes_its_row_on_stop(store):
    free = iter(range(100, 0, -1))
    adv = Advertiser(store.engine, "gpu-node-2", ["0", "1"], 2, lambda: next(free), every_s=0.05)
    adv.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = list_workers(store.engine, 120)
        if rows and rows[0]["free_gpus"] <= 98:  # several beats, each with the allocator's count
            break
        time.sleep(0.05)
    assert rows[0]["name"] == "gpu-node-2" and rows[0]["gpus"] == 2 and rows[0]["info"]["gpu_ids"] == ["0", "1"]
    adv.stop()
    assert not adv.is_alive() and list_workers(store.engine, 120) == []


def test_check_fits(store, db_settings):
    engine = store.engine
    # no live worker: accepted, and the reason it waits for says so
    assert check_fits(engine, "train", train(2), db_settings) == (
        "no live worker has 2 GPUs (no worker is live); the job starts when one with 2 joins")
    assert check_fits(engine, "train", train(1), db_settings) is None
    advertise(engine, "gpu-node-1", hostname="h", gpus=4, free_gpus=0, slots=4)
    advertise(engine, "gpu-node-2", hostname="h", gpus=2, free_gpus=2, slots=2)
    assert check_fits(engine, "train", train(4), db_settings) is None  # fits the largest (busy or not)
    assert check_fits(engine, "train", train("auto"), db_settings) is None
    assert check_fits(engine, "train", train(8, "cpu"), db_settings) is None  # CPU ranks take no GPU
    assert check_fits(engine, "predict", {"device": "auto"}, db_settings) is None
    with pytest.raises(InvalidInput) as info:
        check_fits(engine, "train", train(8), db_settings)
    assert info.value.status == 422
    assert info.value.details[0]["field"] == "training.processes"
    assert "largest live worker (gpu-node-1) has 4" in info.value.details[0]["message"]
    age(engine, "gpu-node-1", 3600)  # a dead worker no longer counts
    with pytest.raises(InvalidInput, match="gpu-node-2. has 2"):
        check_fits(engine, "train", train(4), db_settings)


def test_only_cpu_workers_live_means_no_gpu_limit(store, db_settings):
    advertise(store.engine, "cpu-node", hostname="h", gpus=0, free_gpus=0, slots=1)
    assert check_fits(store.engine, "train", train(4), db_settings) is None  # gloo ranks on that CPU


def test_job_taken_and_pending_reason(store):
    job = store.create("train", train(2))
    assert workers.job_taken(store.engine, job["id"]) is None
    workers.set_pending_reason(store.engine, job["id"], "waiting", in_hand=False)
    row = store.get(job["id"])
    assert row["pending_reason"] == "waiting" and row["enqueued_at"] is None
    assert store.acquire_lease(job["id"], "x/1/y", 60)
    assert workers.job_taken(store.engine, job["id"]) == "leased"
    store.release_lease(job["id"], "x/1/y")
    store.request_cancel(job["id"])
    assert workers.job_taken(store.engine, job["id"]) == "cancelled"
    assert workers.job_taken(store.engine, "0" * 32) == "gone"


@pytest.fixture
def client(db_settings):
    s = dataclasses.replace(db_settings, redis_url="redis://127.0.0.1:1/0")  # no broker: jobs stay queued
    with running_app(s) as app:
        yield app.test_client(), app


def test_get_v1_workers_lists_them(client):
    c, app = client
    assert c.get("/v1/workers").get_json() == {"workers": []}
    engine = app.extensions["kiln"].engine
    advertise(engine, "gpu-node-1", hostname="h1", gpus=4, free_gpus=3, slots=4, info={"gpu_ids": ["0"]})
    body = c.get("/v1/workers").get_json()
    assert [(w["name"], w["gpus"], w["free_gpus"], w["live"]) for w in body["workers"]] == [("gpu-node-1", 4, 3, True)]
    spec = c.get("/openapi.json").get_json()
    assert spec["paths"]["/v1/workers"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WorkerList"}


def test_submit_refuses_more_gpus_than_the_largest_live_worker(client):
    c, app = client
    engine = app.extensions["kiln"].engine
    advertise(engine, "gpu-node-1", hostname="h1", gpus=4, free_gpus=4, slots=4)
    r = c.post("/v1/jobs", json={"kind": "train", "config": train(8)})
    assert r.status_code == 422, r.get_json()
    err = r.get_json()["error"]
    assert err["details"][0]["field"] == "training.processes" and "has 4" in err["details"][0]["message"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.jobs)).scalar() == 0  # nothing stored
    assert c.post("/v1/jobs", json={"kind": "train", "config": train(4)}).status_code == 202


def test_submit_with_no_live_worker_is_accepted_with_a_pending_reason(client):
    c, app = client
    r = c.post("/v1/jobs", json={"kind": "train", "config": train(2)})
    assert r.status_code == 202, r.get_json()
    row = app.extensions["kiln"].store.get(r.get_json()["id"])
    assert row["pending_reason"].startswith("no live worker has 2 GPUs")
    assert r.get_json()["queue"]["reason"] == row["pending_reason"]  # what the job JSON shows


def test_submit_refuses_a_batch_that_does_not_split_across_processes(client):
    c, _ = client
    r = c.post("/v1/jobs", json={"kind": "train", "config": train(3, batch_size=64)})
    assert r.status_code == 422
    fields = {d["field"]: d["message"] for d in r.get_json()["error"]["details"]}
    assert "training.batch_size" in fields and "multiple of training.processes (3)" in fields["training.batch_size"]
    r = c.post("/v1/jobs", json={"kind": "train", "config": {"training": {"processes": 3}}})  # default 128
    assert r.status_code == 422 and r.get_json()["error"]["details"][0]["field"] == "training.batch_size"
