"""training.processes: 2 over HTTP on a live Kiln (real Redis, Celery worker, gunicorn), gloo on CPU:
the same accuracy as one process at the same global batch, the model registered and served, cancel
stopping both ranks, and a SIGKILLed rank ending the attempt, resumed on the next one.

The job process of a 2-rank job is the parent of both ranks: worker -> pool process -> job process -> ranks.
A 2-rank checkpoint resumed at 1 rank is tested in tests/unit/test_ddp.py (a job's world size cannot
change between its attempts over HTTP).
"""
from __future__ import annotations

import io
import os
import signal
import time

import pytest
import requests

from worker.procs import alive, cmdline
from worker.store import JobStore

pytestmark = pytest.mark.integration


# All 1797 digits (359 validation images: one image is 0.28 points), 5 epochs of global batch 64.
FULL = {"data": {"image_size": 16}, "training": {"epochs": 5, "batch_size": 64}}
# Long enough to act mid-epoch: 60 (cancel) or 40 (kill) steps an epoch of a few tens of ms each.
LONG = {"data": {"image_size": 16, "subset": 600}, "training": {"epochs": 20, "batch_size": 8}}


def processes(cfg: dict, n: int) -> dict:
    return {**cfg, "training": {**cfg["training"], "processes": n}}


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def ranks(service) -> list[int]:
    """The running job's ranks: the job process's children (the worker's great-grandchildren), less
    multiprocessing's resource tracker, which spawned ranks (CUDA's start method) come with."""
    level = [service.worker.pid]
    for _ in range(3):
        level = [c for p in level for c in children(p)]
    return sorted(p for p in level if "resource_tracker" not in cmdline(p))


def wait_until(service, job_id: str, ready, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.job(job_id)
        if job["status"] == "running" and ready(job):
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    pytest.fail(f"job never got there: {service.job(job_id)}")


def digit_png(k: int) -> tuple[str, bytes]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    buf = io.BytesIO()
    Image.fromarray(np.rint(d.images[k] * 255 / 16).astype(np.uint8), "L").save(buf, "PNG")
    return str(d.target[k]), buf.getvalue()


def test_two_process_job_matches_one_process_and_its_model_is_served(live_service):
    s = live_service
    one = s.wait(s.submit(FULL)["id"], timeout=300)
    two = s.wait(s.submit(processes(FULL, 2))["id"], timeout=300)
    assert one["status"] == two["status"] == "succeeded", (one, two)
    assert two["world_size"] == 2
    gap = abs(two["metrics"]["best"]["val_accuracy"] - one["metrics"]["best"]["val_accuracy"])
    assert gap <= 0.01, (one["metrics"], two["metrics"])
    log = requests.get(s.url(f"/v1/jobs/{two['id']}/logs"), timeout=30).text
    assert "2 ranks (gloo): 32 of each batch of 64 per rank" in log
    r = requests.post(s.url("/v1/models"), json={"name": "ddp-digits", "job_id": two["id"], "checkpoint": "best"},
                      timeout=120)
    assert r.status_code == 201, r.text
    labels, images = zip(*(digit_png(k) for k in range(1700, 1720)))
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = requests.post(s.url("/predict"), params={"model": "ddp-digits"}, files=files, timeout=120)
    assert r.status_code == 200, r.text
    served = [p["label"] for p in r.json()["predictions"]]
    assert sum(a == b for a, b in zip(served, labels)) >= 18


def test_cancel_mid_epoch_stops_both_ranks(live_service):
    s = live_service
    job = s.submit(processes(LONG, 2))
    wait_until(s, job["id"], lambda j: (j["progress"]["step"] or 0) >= 10 and len(ranks(s)) == 2)
    pids = ranks(s)
    assert requests.post(s.url(f"/v1/jobs/{job['id']}/cancel"), timeout=30).status_code in (200, 202)
    done = s.wait(job["id"], timeout=120)
    assert done["status"] == "cancelled", done
    reason = JobStore.from_settings(s.settings).events(job["id"])[-1]["reason"]
    assert "checkpoint written" in reason, reason                 # stopped at a step boundary, not killed
    assert not any(alive(p) for p in pids)
    sidecar = requests.get(s.url(f"/v1/jobs/{job['id']}/artifacts/checkpoints/last.json"), timeout=30).json()
    assert sidecar["world_size"] == 2 and sidecar["batch_in_epoch"] > 0


def test_a_sigkilled_rank_ends_the_attempt_and_the_job_resumes(live_service):
    s = live_service
    cfg = processes({**LONG, "data": {"image_size": 16, "subset": 400}, "training": {**LONG["training"], "epochs": 6}}, 2)
    job = s.submit(cfg)
    wait_until(s, job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 2 and len(ranks(s)) == 2)
    os.kill(ranks(s)[-1], signal.SIGKILL)
    done = s.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    events = JobStore.from_settings(s.settings).events(job["id"])
    assert [e["to"] for e in events] == ["queued", "running", "queued", "running", "succeeded"]
    assert "killed by SIGKILL" in events[2]["reason"], events
    log = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert "resuming from checkpoint at epoch" in log
