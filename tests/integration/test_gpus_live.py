"""GPU reservation on a live Kiln (real Redis, Celery worker, gunicorn) whose worker is given fake GPU
ids (CUDA_VISIBLE_DEVICES=0,1,2,3 on a CPU machine: the allocator and the advertisement see four GPUs,
the ranks run on gloo since torch finds no CUDA device). The worker advertises its GPUs, a job asking
for more than it has is refused at submit, and a 2-GPU job waits with a pending reason while the test
itself holds three of the four GPUs, then runs once they are released."""
from __future__ import annotations

import os
import time

import pytest
import requests

from worker.gpus import Allocator
from worker.live import TINY, LiveService

pytestmark = pytest.mark.integration
FAKE = ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(FAKE)  # the worker's environment is copied at start
    svc = LiveService(tmp_path_factory.mktemp("gpus") / "var")
    try:
        svc.start()
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    try:
        yield svc
    finally:
        svc.stop()


def workers(svc) -> list[dict]:
    r = requests.get(svc.url("/v1/workers"), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["workers"]


def eventually(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_the_worker_advertises_its_gpus_and_submit_refuses_more(service):
    listed = eventually(lambda: [w for w in workers(service) if w["live"]])
    assert len(listed) == 1
    w = listed[0]
    assert (w["gpus"], w["free_gpus"], w["slots"], w["info"]["gpu_ids"]) == (4, 4, 1, FAKE)
    r = requests.post(service.url("/v1/jobs"), timeout=30,
                      json={"config": {**TINY, "training": {**TINY["training"], "processes": 8}}})
    assert r.status_code == 422, r.text
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "training.processes" and f"({w['name']}) has 4" in detail["message"]


def test_a_job_waits_for_its_gpus_then_runs_on_them(service):
    name = eventually(lambda: [w for w in workers(service) if w["live"]])[0]["name"]
    held = Allocator(FAKE, service.settings.home_path / "gpus").try_reserve(3)  # as three other jobs would
    assert held is not None
    try:
        job = service.submit({**TINY, "training": {**TINY["training"], "processes": 2}})
        want = f"waiting for 2 free GPUs on worker {name} (1 free)"
        seen = eventually(lambda: service.job(job["id"])["queue"]["reason"] == want)
        assert seen, service.job(job["id"])
        assert service.job(job["id"])["status"] == "queued"
        assert eventually(lambda: [w for w in workers(service) if w["free_gpus"] == 1])  # the advertisement too
    finally:
        held.release()
    done = service.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", (done, service.worker_log()[-3000:])
    assert done["world_size"] == 2 and done["queue"]["reason"] is None
    assert eventually(lambda: [w for w in workers(service) if w["free_gpus"] == 4])  # released after the job
