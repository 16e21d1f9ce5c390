"""Priorities in a real Redis that Celery/kombu published to: the order the broker hands jobs out,
the reconciler's view of every priority list, and the store's queue positions, retry and
idempotency keys."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from worker import db
from worker.clock import utcnow
from worker.errors import Conflict
from worker.idempotency import IdempotencyKeys, body_digest
from worker.protocol import broker_priority, queue_lists, send_job
from worker.reconcile import queued_in_broker, reconcile


def _drain(app) -> list[str]:
    """Job ids in the order kombu's Redis channel delivers them (the worker's consumer order)."""
    out = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get("kiln", no_ack=True)) is not None:
            out.append(message.headers["id"])
    return out


def test_kiln_priority_maps_to_kombus_reversed_scale():
    assert [broker_priority(p) for p in (0, 1, 5, 9)] == [9, 8, 4, 0]
    assert broker_priority(None) == 9 and broker_priority(42) == 0 and broker_priority(-3) == 9
    assert queue_lists()[0] == "kiln" and queue_lists()[9] == "kiln\x06\x169" and len(queue_lists()) == 10


def test_the_broker_hands_out_higher_priority_first_then_first_come(store, celery_app):
    order = [0, 3, 9, 0, 3, 9, 5]
    jobs = [store.create("train", {}, priority=p) for p in order]
    for job in jobs:
        send_job(celery_app, job)
    expected = [j["id"] for j in sorted(jobs, key=lambda j: -j["priority"])]  # sorted() is stable: first-come
    assert _drain(celery_app) == expected


def test_every_priority_list_is_seen_so_nothing_is_resent(store, celery_app, client, broker_settings):
    jobs = [store.create("train", {}, priority=p) for p in range(10)]
    for job in jobs:
        send_job(celery_app, job)
    assert len(client.keys("kiln*")) == 10  # one list per priority step
    assert queued_in_broker(client) == {j["id"] for j in jobs}
    lost = store.create("train", {}, priority=7)  # stored while the broker was down: never sent
    sent = []
    out = reconcile(store, lambda job: sent.append(job["id"]), broker_settings, broker=client)
    assert sent == out["resent"] == [lost["id"]]


def test_a_resent_job_keeps_its_priority(store, celery_app, client, broker_settings):
    low, high = store.create("train", {}, priority=0), store.create("train", {}, priority=8)
    reconcile(store, lambda job: send_job(celery_app, job), broker_settings, broker=client)
    assert _drain(celery_app) == [high["id"], low["id"]]


# ------------------------------------------------------------------ store: positions and retry
def test_queue_positions_in_one_query(store):
    a = store.create("train", {}, priority=0)
    b = store.create("train", {}, priority=2)
    c = store.create("train", {}, priority=0)
    d = store.create("train", {}, priority=2)
    store.request_cancel(b["id"])
    rows = [store.get(j["id"]) for j in (a, b, c, d)]
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        out = store.job_dicts(rows)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
    assert [j["queue"]["position"] for j in out] == [2, None, 3, 1]
    assert [j["queue"]["reason"] for j in out] == ["1 job ahead", None, "2 jobs ahead",
                                                   "next in line; waiting for a free worker"]
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1


def test_retry_moves_only_failed_or_cancelled_jobs_back_to_queued(store):
    job = store.create("train", {}, max_attempts=2)
    with pytest.raises(Conflict, match="queued"):
        store.retry(job["id"], extra_attempts=3)
    assert store.transition(job["id"], "failed", "boom", error="boom")
    assert not store.transition(job["id"], "queued", "no: terminal")  # the ordinary guard still holds
    again = store.retry(job["id"], extra_attempts=3)
    assert again["status"] == "queued" and again["error"] is None and again["max_attempts"] == 3
    assert again["finished_at"] is None
    assert store.events(job["id"])[-1]["reason"].startswith("retried by user")
    store.request_cancel(job["id"])
    assert store.retry(job["id"], extra_attempts=3)["cancel_requested"] is False
    with store.engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.id == job["id"]).values(status="succeeded"))
    with pytest.raises(Conflict, match="succeeded"):
        store.retry(job["id"], extra_attempts=3)


# ------------------------------------------------------------------ idempotency keys
def test_idempotency_key_claim_replay_conflict_and_expiry(store):
    keys = IdempotencyKeys(store.engine, ttl_s=60, wait_s=0.3)
    digest = body_digest("application/json", b"{}")
    assert keys.begin("tok", "POST /v1/jobs", "k", digest) is None  # claimed
    with pytest.raises(Conflict, match="in progress"):
        keys.begin("tok", "POST /v1/jobs", "k", digest)
    keys.complete("tok", "POST /v1/jobs", "k", 202, {"id": "abc"})
    assert keys.begin("tok", "POST /v1/jobs", "k", digest) == (202, {"id": "abc"})
    with pytest.raises(Conflict, match="different request body"):
        keys.begin("tok", "POST /v1/jobs", "k", body_digest("application/json", b"{ }"))
    assert keys.begin("other", "POST /v1/jobs", "k", digest) is None  # another caller's key
    assert keys.begin("tok", "POST /v1/datasets", "k", digest) is None  # another endpoint's key
    with store.engine.begin() as conn:  # a day passes
        conn.execute(db.idempotency_keys.update().values(created_at=utcnow() - timedelta(seconds=61)))
    assert keys.begin("tok", "POST /v1/jobs", "k", body_digest("x", b"new")) is None  # expired: free again


def test_a_released_or_stale_pending_key_is_claimed_again(store):
    keys = IdempotencyKeys(store.engine, ttl_s=3600, wait_s=0.2, stale_after_s=30)
    assert keys.begin("tok", "e", "k", "d") is None
    keys.release("tok", "e", "k")
    assert keys.begin("tok", "e", "k", "d") is None
    with store.engine.begin() as conn:  # its request died long ago, never answering
        conn.execute(db.idempotency_keys.update().values(created_at=utcnow() - timedelta(seconds=31)))
    assert keys.begin("tok", "e", "k", "d") is None


def test_concurrent_claims_have_one_winner(store):
    keys = IdempotencyKeys(store.engine, ttl_s=3600, wait_s=0.5)
    results, barrier = [], threading.Barrier(6)

    def claim():
        barrier.wait()
        try:
            results.append(keys.begin("tok", "e", "k", "d"))
        except Conflict as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(None) == 1 and results.count("idempotency_key_in_progress") == 5
