"""What the broker holds, read from a real Redis that Celery/kombu published to: the reconciler's
view of the queue and the facade's queue depth. No fake Redis: the message format is kombu's own."""
from __future__ import annotations

import dataclasses


from worker.protocol import send_job
from worker.reconcile import queued_in_broker, reconcile
from worker.service import Kiln

def test_queued_in_broker_reads_kombus_messages_at_every_priority(store, celery_app, client):
    """kombu keeps priorities 1-9 in separate lists (kiln\\x06\\x163, ...): each one is read."""
    jobs = [store.create("train", {}) for _ in range(4)]
    for job, priority in zip(jobs, (None, 0, 5, 9)):
        send_job(celery_app, job, **({} if priority is None else {"priority": priority}))
    assert len(client.keys("kiln*")) >= 3  # the plain list and two priority lists really exist
    assert queued_in_broker(client) == {job["id"] for job in jobs}


def test_reconcile_resends_only_jobs_whose_message_is_gone(store, celery_app, client, broker_settings):
    waiting, lost = store.create("train", {}), store.create("train", {})
    send_job(celery_app, waiting)  # in the queue; ``lost`` was stored while the broker was down
    sent = []
    out = reconcile(store, lambda job: sent.append(job["id"]), broker_settings, broker=client)
    assert sent == out["resent"] == [lost["id"]]


def test_queue_depth_counts_waiting_jobs(broker_settings, celery_app, store):
    kiln = Kiln(broker_settings)
    try:
        assert kiln.queue_depth() == 0
        for _ in range(3):
            send_job(celery_app, store.create("predict", {}))
        assert kiln.queue_depth() == 3
    finally:
        kiln.close()


def test_queue_depth_is_none_while_the_broker_is_down(db_settings, tmp_path):
    kiln = Kiln(dataclasses.replace(db_settings, redis_url=f"unix://{tmp_path}/no-redis.sock"))
    assert kiln.queue_depth() is None
