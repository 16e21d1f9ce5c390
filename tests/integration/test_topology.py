"""Kiln as several hosts: one web host and two worker hosts, each a process group of its own with
its own KILN_HOME and no shared disk, sharing a PostgreSQL store, Redis over TCP and an S3 bucket
(moto's server; s3fs as Kiln's client). PostgreSQL comes from KILN_TEST_POSTGRES_URL or is started
here; without one the test fails and says how to get one."""
from __future__ import annotations

import hashlib
import json
import time

import pytest
import requests

from tests.integration.test_jobs_http import _digits_zip
from worker.db import make_engine
from worker.live import ROOT, TINY
from worker.store import JobStore
from worker.topology import BUCKET, FAST, HOST_SETTINGS, PREFIX, S3_ENV, Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("topology"))
    try:
        yield c.start()
    finally:
        c.stop()


def config(epochs: int) -> dict:
    return {**TINY, "training": {**TINY["training"], "epochs": epochs}}


def served_matches_bucket(c: Cluster, job_id: str) -> None:
    listed = c.get(f"/v1/jobs/{job_id}/artifacts")
    assert listed.status_code == 200, listed.text
    stored = c.bucket(job_id)
    for item in listed.json()["artifacts"]:
        body = c.get(f"/v1/jobs/{job_id}/artifacts/{item['name']}").content
        assert body == stored[item["name"]], item["name"]
        assert hashlib.sha256(body).hexdigest() == item["sha256"] and len(body) == item["size"], item
    assert c.get(f"/v1/jobs/{job_id}/logs").content == stored["train.log"]
    epochs = [json.loads(line) for line in stored["metrics.jsonl"].splitlines()]
    assert len(c.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]) == sum(e.get("type") == "epoch"
                                                                          for e in epochs)


def test_deploy_readme_names_every_setting_a_host_is_given():
    """The hosts run on these settings alone (worker.topology.Host): each is named in deploy/README.md."""
    text = (ROOT / "deploy" / "README.md").read_text()
    missing = [k for k in (*HOST_SETTINGS, *S3_ENV, "AWS_ENDPOINT_URL") if f"`{k}`" not in text]
    assert not missing, missing


def test_the_web_host_serves_what_the_worker_hosts_put_in_the_bucket(cluster):
    c = cluster
    job = c.submit(config(4))
    c.wait(job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 1 or j["status"] != "queued")
    answers = []
    while c.job(job["id"])["status"] in ("queued", "running"):
        answers.append(c.get(f"/v1/jobs/{job['id']}/artifacts").status_code)
        logs, metrics = c.get(f"/v1/jobs/{job['id']}/logs"), c.get(f"/v1/jobs/{job['id']}/metrics")
        assert logs.status_code == 200 and metrics.status_code == 200
        time.sleep(0.3)
    assert answers and set(answers) == {200}, answers
    done = c.job(job["id"])
    assert done["status"] == "succeeded", done
    stored = c.bucket(job["id"])
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "train.log", "metrics.jsonl", "config.yaml"} <= set(stored)
    served_matches_bucket(c, job["id"])


def test_a_killed_worker_host_job_resumes_on_the_other_from_the_bucket(cluster):
    c = cluster
    job = c.submit(config(6))
    running = c.wait(job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 1 and j["status"] == "running"
                     and "checkpoints/last.pt" in c.bucket(j["id"]))
    first = running["worker"]
    other = "worker-b" if first == "worker-a" else "worker-a"
    c.hosts[first].kill()  # mid-epoch: the progress is past an epoch boundary with a checkpoint
    try:
        done = c.wait(job["id"])
    finally:
        c.hosts[first].start()
    assert (done["status"], done["attempts"], done["worker"]) == ("succeeded", 2, other), done
    log = c.bucket(job["id"])["train.log"].decode()
    assert "resum" in log.lower(), log[-2000:]
    served_matches_bucket(c, job["id"])


def test_an_uploaded_dataset_trains_on_a_worker_host_with_defaults(cluster):
    c = cluster
    r = requests.post(c.hosts["web"].url("/v1/datasets"), files={"file": ("digits.zip", _digits_zip(), "application/zip")},
                      timeout=60)
    assert r.status_code == 201, r.text
    job = c.submit({"data": {"dataset": r.json()["id"], "image_size": 16}, "training": {"epochs": 1}})
    done = c.wait(job["id"])
    assert done["status"] == "succeeded", done


def test_redis_restarted_mid_run_loses_no_job(cluster):
    c = cluster
    jobs = [c.submit(config(2)) for _ in range(3)]
    c.wait(jobs[0]["id"], lambda j: j["status"] != "queued")
    c.redis.restart()
    for job in jobs:
        done = c.wait(job["id"])
        # each ran once: the messages a restart duplicates (deploy/README.md) were dropped by the lease
        assert (done["status"], done["attempts"]) == ("succeeded", 1), done
        assert events(c, job["id"]) == ["queued", "running", "succeeded"]


def test_a_queued_jobs_message_deleted_from_redis_is_sent_again(cluster):
    import redis

    from worker.reconcile import queued_in_broker

    c = cluster
    workers = [c.hosts["worker-a"], c.hosts["worker-b"]]
    for host in workers:
        host.stop()
    try:
        job = c.submit(config(1))
        client = redis.Redis.from_url(c.redis.url)
        assert job["id"] in queued_in_broker(client)
        for key in client.keys("kiln*"):  # the message is lost: every list entry naming the job goes
            if client.type(key) == b"list":
                for raw in client.lrange(key, 0, -1):
                    if job["id"].encode() in raw:
                        client.lrem(key, 0, raw)
        assert job["id"] not in queued_in_broker(client)
        client.close()
    finally:
        for host in workers:
            host.start()
    done = c.wait(job["id"], timeout=120)
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done


def test_a_model_registered_on_the_web_host_is_served_from_the_bucket(cluster):
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    c = cluster
    done = c.wait(c.submit(config(1))["id"])
    assert done["status"] == "succeeded", done
    r = requests.post(c.hosts["web"].url("/v1/models"), json={"name": "topo", "job_id": done["id"]}, timeout=300)
    assert r.status_code == 201, r.text
    keys = [o["Key"] for o in c.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/models/topo/")
            .get("Contents", [])]
    assert any(k.endswith("/model.pt") for k in keys), keys
    png = io.BytesIO()
    Image.fromarray(np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8), "L").save(png, "PNG")
    r = requests.post(c.hosts["web"].url("/predict?model=topo"), files={"image": ("d.png", png.getvalue(),
                                                                                  "image/png")}, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"]["name"] == "topo" and len(answer["predictions"]) == 1, answer


def events(c: Cluster, job_id: str) -> list[str]:
    return [e["to"] for e in JobStore(make_engine(c.hosts["web"].settings)).events(job_id)]


def requests_while_the_store_is_down(c: Cluster, job_id: str, seconds: float) -> list[tuple]:
    """Reads and a submit on the web host for ``seconds`` of the outage: (path, status, body, elapsed)."""
    answers, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        for method, path, body in (("GET", f"/v1/jobs/{job_id}", None), ("GET", "/v1/jobs", None),
                                   ("POST", "/v1/jobs", {"kind": "train", "config": config(1)})):
            t0 = time.monotonic()
            r = requests.request(method, c.hosts["web"].url(path), json=body, timeout=30)
            answers.append((f"{method} {path}", r.status_code, r.json(), time.monotonic() - t0))
        time.sleep(0.3)
    return answers


def store_outage(c: Cluster, job_id: str, down_s: float) -> None:
    """Stop PostgreSQL for ``down_s`` seconds mid-run: every request in the outage is a quick 503 JSON
    naming the store (not a 500, not a hang), and the web host answers again once it is back."""
    if not c.pg.restartable:
        pytest.skip("KILN_TEST_POSTGRES_URL's server cannot be restarted here: install PostgreSQL")
    c.pg.stop_server()
    try:
        answers = requests_while_the_store_is_down(c, job_id, down_s)
    finally:
        c.pg.start_server()
    assert answers
    for what, status, body, elapsed in answers:
        assert status == 503 and body["error"]["code"] == "store_unavailable", (what, status, body)
        assert body["error"]["details"] == {"dependency": "store"} and elapsed < 10, (what, body, elapsed)
    deadline = time.monotonic() + 30
    while c.get(f"/v1/jobs/{job_id}").status_code != 200:
        assert time.monotonic() < deadline, "the web host did not recover after PostgreSQL came back"
        time.sleep(0.2)


def test_postgres_restarted_mid_run_loses_no_job(cluster):
    """An outage shorter than the lease: the running attempt keeps its job and ends it (attempts 1)."""
    c = cluster
    job = c.submit(config(6))
    c.wait(job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 1 and j["status"] == "running")
    store_outage(c, job["id"], down_s=FAST["lease_timeout_s"] / 2)
    done = c.wait(job["id"])
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert events(c, job["id"]) == ["queued", "running", "succeeded"]
    stored = c.bucket(job["id"])
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "train.log", "metrics.jsonl"} <= set(stored)
    served_matches_bucket(c, job["id"])


def test_postgres_down_past_the_lease_resumes_the_job_once(cluster):
    """An outage longer than the lease: the running attempt cannot renew it, so it ends its job process
    (another worker may hold the job by now); once the store is back the job is requeued and resumes
    from its bucket checkpoint, attempts 2, and the first attempt records nothing more."""
    c = cluster
    job = c.submit({**config(12), "data": {**TINY["data"], "subset": 600}})
    c.wait(job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 1 and j["status"] == "running"
           and "checkpoints/last.pt" in c.bucket(j["id"]))
    store_outage(c, job["id"], down_s=FAST["lease_timeout_s"] + 3)
    done = c.wait(job["id"])
    assert (done["status"], done["attempts"]) == ("succeeded", 2), done
    assert events(c, job["id"]) == ["queued", "running", "queued", "running", "succeeded"]
    log = c.bucket(job["id"])["train.log"].decode()
    assert log.lower().count("resuming from checkpoint") == 1, log[-2000:]
    served_matches_bucket(c, job["id"])
