"""The queue over the Flask client: Idempotency-Key on POST /v1/jobs and /v1/datasets, priority
bounds, queue positions and reasons, and POST /v1/jobs/<id>/retry's guards. Real store, real Redis
(no worker: submitted jobs stay queued)."""
from __future__ import annotations

import dataclasses
import io
import threading

import pytest
import yaml

from tests.api.conftest import TRAIN, error_of, make_zip
from web.auth import token_store
from tests.conftest import running_app

KEY = "Idempotency-Key"


def submit(client, body=None, key=None, **kw):
    headers = {KEY: key} if key is not None else {}
    return client.post("/v1/jobs", json=body or {"kind": "train", "config": TRAIN}, headers=headers, **kw)


def job_count(client) -> int:
    return client.get("/v1/jobs").get_json()["total"]


# ------------------------------------------------------------------ Idempotency-Key
def test_same_key_and_body_answers_the_first_job(client):
    first = submit(client, key="order-42")
    assert first.status_code == 202
    again = submit(client, key="order-42")
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()  # the same answer, the same job id
    assert again.headers["Location"] == first.headers["Location"]
    assert job_count(client) == 1
    other = submit(client, key="order-43")  # another key: another job
    assert other.get_json()["id"] != first.get_json()["id"] and job_count(client) == 2


def test_same_key_with_another_body_is_409_naming_the_key(client):
    assert submit(client, key="k-1").status_code == 202
    err = error_of(submit(client, {"kind": "train", "config": {**TRAIN, "training": {"epochs": 2}}}, key="k-1"), 409)
    assert err["code"] == "idempotency_key_reused" and "k-1" in err["message"]
    assert job_count(client) == 1
    # the same bytes as YAML are another request (the content type is part of what is compared)
    body = yaml.safe_dump({"kind": "train", "config": TRAIN})
    assert client.post("/v1/jobs", data=body, content_type="application/yaml", headers={KEY: "k-2"}).status_code == 202
    err = error_of(client.post("/v1/jobs", data=body, content_type="application/yaml", headers={KEY: "k-2"},
                               query_string={"priority": 5}), 409)
    assert "k-2" in err["message"]


@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_malformed_key_is_400(client, key):
    err = error_of(submit(client, key=key), 400)
    assert err["code"] == "bad_idempotency_key" and KEY in err["message"]
    assert job_count(client) == 0


def test_a_key_of_255_visible_characters_is_accepted(client):
    key = "".join(chr(0x21 + i % 94) for i in range(255))
    first, again = submit(client, key=key), submit(client, key=key)
    assert first.status_code == again.status_code == 202 and first.get_json()["id"] == again.get_json()["id"]


def test_a_failed_request_does_not_keep_its_key(client):
    bad = {"kind": "train", "config": {"training": {"epochs": 0}}}
    assert submit(client, bad, key="retry-me").status_code == 422
    assert submit(client, bad, key="retry-me").status_code == 422  # not a replay, not a 409: evaluated again
    ok = submit(client, key="retry-me")  # the fixed request under the same key
    assert ok.status_code == 202 and job_count(client) == 1


def test_keys_belong_to_their_caller(api_settings):
    """With auth on, two tokens using the same key get two jobs; each replays its own."""
    s = dataclasses.replace(api_settings, auth_enabled=True)
    with running_app(s) as app:
        client = app.test_client()
        tokens = [token_store(app).create(f"caller-{i}", ["submit"])[0] for i in range(2)]
        ids = []
        for token in tokens + tokens:
            resp = client.post("/v1/jobs", json={"kind": "train", "config": TRAIN},
                               headers={KEY: "shared", "Authorization": f"Bearer {token}"})
            assert resp.status_code == 202, resp.get_data(as_text=True)
            ids.append(resp.get_json()["id"])
        assert ids[0] != ids[1] and ids[2:] == ids[:2]


def test_concurrent_duplicates_create_one_job(app):
    """Eight threads send the same keyed request at once: one job; every answer names it (or says the
    first is still in progress)."""
    answers, barrier = [], threading.Barrier(8)

    def send():
        client = app.test_client()
        barrier.wait()
        resp = submit(client, key="burst")
        answers.append((resp.status_code, resp.get_json()))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8
    ids = {body["id"] for status, body in answers if status == 202}
    assert len(ids) == 1
    assert all(status == 202 or (status == 409 and body["error"]["code"] == "idempotency_key_in_progress")
               for status, body in answers)
    assert job_count(app.test_client()) == 1


def test_dataset_upload_with_a_key_is_stored_once(client, digits_entries):
    data = make_zip(digits_entries)

    def upload(payload, name="digits"):
        return client.post("/v1/datasets", data={"file": (io.BytesIO(payload), "digits.zip"), "name": name},
                           content_type="multipart/form-data", headers={KEY: "upload-1"})

    first = upload(data)
    assert first.status_code == 201, first.get_data(as_text=True)
    again = upload(data)  # a new multipart boundary, the same dataset: replayed
    assert again.status_code == 201 and again.get_json() == first.get_json()
    assert len(client.get("/v1/datasets").get_json()["datasets"]) == 1
    err = error_of(upload(data, name="other-name"), 409)
    assert "upload-1" in err["message"]
    raw = client.post("/v1/datasets?name=raw", data=data, content_type="application/zip", headers={KEY: "upload-2"})
    raw_again = client.post("/v1/datasets?name=raw", data=data, content_type="application/zip",
                            headers={KEY: "upload-2"})
    assert raw.status_code == raw_again.status_code == 201 and raw.get_json()["id"] == raw_again.get_json()["id"]
    assert len(client.get("/v1/datasets").get_json()["datasets"]) == 2


# ------------------------------------------------------------------ priority and the queue
@pytest.mark.parametrize("priority", [-1, 10, 1.5, "5", True, None])
def test_priority_out_of_range_or_wrong_type_is_422_naming_it(client, priority):
    err = error_of(submit(client, {"kind": "train", "config": TRAIN, "priority": priority}), 422)
    assert "priority" in {d["field"] for d in err["details"]}


@pytest.mark.parametrize("query", ["10", "-1", "high", "1.5"])
def test_priority_query_out_of_range_is_400_naming_it(client, query):
    resp = client.post(f"/v1/jobs?priority={query}", data=yaml.safe_dump(TRAIN), content_type="application/yaml")
    err = error_of(resp, 400)
    assert "priority" in {d["field"] for d in err["details"]}


def test_priority_from_json_yaml_document_and_query(client):
    assert submit(client, {"kind": "train", "config": TRAIN, "priority": 7}).get_json()["priority"] == 7
    doc = yaml.safe_dump({"kind": "train", "config": TRAIN, "priority": 4})
    assert client.post("/v1/jobs", data=doc, content_type="application/yaml").get_json()["priority"] == 4
    bare = client.post("/v1/jobs?priority=9", data=yaml.safe_dump(TRAIN), content_type="application/yaml")
    assert bare.status_code == 202 and bare.get_json()["priority"] == 9
    assert submit(client).get_json()["priority"] == 0  # the default
    both = client.post("/v1/jobs?priority=2", json={"kind": "train", "config": TRAIN, "priority": 3})
    assert both.status_code == 202 and both.get_json()["priority"] == 3  # the body's wins
    assert client.post("/v1/jobs?priority=2", json={"config": TRAIN}).get_json()["priority"] == 2


def test_queue_positions_follow_priority_then_submission(client):
    low1 = submit(client).get_json()
    low2 = submit(client).get_json()
    high = submit(client, {"kind": "train", "config": TRAIN, "priority": 5}).get_json()
    assert (low1["queue"]["position"], low2["queue"]["position"], high["queue"]["position"]) == (1, 2, 1)
    jobs = {j["id"]: j for j in client.get("/v1/jobs").get_json()["jobs"]}
    assert [jobs[j["id"]]["queue"]["position"] for j in (high, low1, low2)] == [1, 2, 3]
    assert jobs[high["id"]]["queue"]["reason"] == "next in line; waiting for a free worker"
    assert jobs[low1["id"]]["queue"]["reason"] == "1 job ahead"
    assert jobs[low2["id"]]["queue"]["reason"] == "2 jobs ahead"
    one = client.get(f"/v1/jobs/{low2['id']}").get_json()
    assert one["queue"] == {"position": 3, "reason": "2 jobs ahead"} and one["parent"] is None
    cancelled = client.post(f"/v1/jobs/{high['id']}/cancel").get_json()
    assert cancelled["queue"] == {"position": None, "reason": None}
    assert client.get(f"/v1/jobs/{low2['id']}").get_json()["queue"]["position"] == 2


def test_a_workers_pending_reason_is_shown(client, kiln):
    job = submit(client).get_json()
    from worker import db

    with kiln.engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.id == job["id"])
                     .values(pending_reason="waiting for a 2-GPU worker"))
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["queue"] == {
        "position": 1, "reason": "waiting for a 2-GPU worker"}


# ------------------------------------------------------------------ retry
def _set_status(kiln, job_id: str, status: str, **values) -> None:
    from worker import db

    with kiln.engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(status=status, **values))


def test_retry_requeues_a_failed_job_in_place(client, kiln):
    job = submit(client).get_json()
    _set_status(kiln, job["id"], "failed", attempts=3, error="boom: worker lost")
    resp = client.post(f"/v1/jobs/{job['id']}/retry")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    again = resp.get_json()
    assert again["id"] == job["id"] and again["status"] == "queued" and again["error"] is None
    assert again["attempts"] == 3 and again["max_attempts"] == 3 + kiln.settings.max_attempts
    assert again["queue"]["position"] == 1 and again["finished_at"] is None
    events = kiln.job_events(job["id"])
    assert events[-1]["from"] == "failed" and events[-1]["to"] == "queued"
    assert "retried by user" in events[-1]["reason"] and "no checkpoint" in events[-1]["reason"]


def test_retry_says_it_resumes_when_a_checkpoint_is_stored(client, kiln):
    job = submit(client).get_json()
    kiln.storage.write_recorded(f"jobs/{job['id']}/checkpoints", "last.pt", b"stub")
    _set_status(kiln, job["id"], "cancelled", cancel_requested=True)
    again = client.post(f"/v1/jobs/{job['id']}/retry").get_json()
    assert again["status"] == "queued" and again["cancel_requested"] is False
    assert "resumes from checkpoints/last.pt" in kiln.job_events(job["id"])[-1]["reason"]


@pytest.mark.parametrize("status", ["queued", "running", "succeeded", "cancelling"])
def test_retry_of_a_job_that_is_not_failed_or_cancelled_is_409(client, kiln, status):
    job = submit(client).get_json()
    if status != "queued":
        _set_status(kiln, job["id"], status)
    err = error_of(client.post(f"/v1/jobs/{job['id']}/retry"), 409)
    assert status in err["message"] and err["code"] == "not_retryable"
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == status


def test_retry_of_an_unknown_job_is_404(client):
    error_of(client.post(f"/v1/jobs/{'0' * 32}/retry"), 404)
    error_of(client.post("/v1/jobs/not-an-id/retry"), 404)
