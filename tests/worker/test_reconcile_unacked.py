"""The reconciler and messages a worker has taken but not acknowledged (kombu's Redis transport
keeps them in the ``unacked`` hash, not in the queue lists): one taken a moment ago is on its way
to its job's lease and is not sent again; one taken longer ago than the lease timeout without its
job being leased or started (its worker died, or holds it behind a running job) is re-sent.
Real Redis, a real kombu consumer."""
from __future__ import annotations

import dataclasses
import time

import pytest
import redis

from worker.protocol import send_job
from worker.reconcile import queued_in_broker, reconcile, taken_recently


def take(app, queue: str = "kiln"):
    """What a worker does with acks_late: the message leaves the queue list for the unacked hash."""
    conn = app.connection_for_read()
    channel = conn.channel()
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None
    return conn, message


@pytest.fixture
def broker_settings(broker_settings):
    """A lease timeout short enough to see a message age past it."""
    return dataclasses.replace(broker_settings, lease_timeout_s=30.0)


def test_a_message_taken_a_moment_ago_is_not_sent_again(store, celery_app, client, broker_settings):
    job = store.create("train", {})
    send_job(celery_app, job)
    conn, message = take(celery_app)
    try:
        assert job["id"] not in queued_in_broker(client)  # not in the queue list any more ...
        assert client.hlen("unacked") == 1
        assert taken_recently(client, broker_settings.lease_timeout_s) == {job["id"]}  # ... but taken
        sent = []
        out = reconcile(store, lambda j: sent.append(j["id"]), broker_settings, broker=client)
        assert sent == out["resent"] == []
    finally:
        conn.release()


def test_a_message_taken_longer_ago_than_the_lease_timeout_is_sent_again(store, celery_app, client,
                                                                        broker_settings):
    job = store.create("train", {})
    send_job(celery_app, job)
    conn, message = take(celery_app)
    try:
        # its worker took it a lease timeout ago and neither leased nor started the job: dead, or busy
        tag = message.delivery_tag
        client.zadd("unacked_index", {tag: time.time() - broker_settings.lease_timeout_s - 1})
        assert taken_recently(client, broker_settings.lease_timeout_s) == set()
        sent = []
        out = reconcile(store, lambda j: sent.append(j["id"]), broker_settings, broker=client)
        assert sent == out["resent"] == [job["id"]]
    finally:
        conn.release()


def test_taken_recently_is_empty_while_the_broker_is_down(tmp_path):
    down = redis.Redis.from_url(f"unix://{tmp_path}/no-redis.sock")
    assert taken_recently(down, 30.0) == set()
