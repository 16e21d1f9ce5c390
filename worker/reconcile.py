"""The reconciler: puts jobs whose worker died back in the queue and re-sends lost messages.

Idempotent and safe to run from several workers at once: every change is a
compare-and-set in the store, and a duplicate message is dropped by the job lease.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from worker.protocol import QUEUE, queue_lists

log = logging.getLogger("kiln.reconcile")


def queued_in_broker(client, queue: str = QUEUE) -> set[str] | None:
    """Task ids waiting in the broker's queue lists (the task id is the job id); None if unreadable.

    kombu keeps each priority step in a list of its own (worker.protocol.queue_lists): every one is
    read, or a queued job of another priority would look lost and be sent twice."""
    try:
        ids = set()
        for name in queue_lists(queue):
            for raw in client.lrange(name, 0, -1):
                try:
                    ids.add(json.loads(raw)["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    continue
        return ids
    except Exception as exc:  # broker down: fall back to re-sending by age
        log.warning("cannot inspect the broker queue: %s", exc)
        return None


def taken_recently(client, within_s: float) -> set[str]:
    """Task ids of messages a worker took from the queue in the last ``within_s`` seconds and has not
    acknowledged (kombu's Redis transport moves a message it delivers into the ``unacked`` hash, its
    delivery time into ``unacked_index``): on their way to the job's lease. Empty if unreadable."""
    try:
        tags = client.zrangebyscore("unacked_index", time.time() - within_s, "+inf")
        ids = set()
        for raw in client.hmget("unacked", tags) if tags else []:
            try:
                ids.add(json.loads(raw)[0]["headers"]["id"])
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        return ids
    except Exception as exc:
        log.warning("cannot inspect the broker's unacknowledged messages: %s", exc)
        return set()


def reconcile(store, send: Callable[[dict], None], settings, *, broker=None, now=None) -> dict:
    """One pass: recover running jobs with a stale lease, re-send queued jobs whose message is gone."""
    recovered, resent, failed = [], [], []
    for job_id in store.stale_active(now):
        new = store.requeue_lost(job_id, "worker lost: its lease expired without a heartbeat")
        if new is None:
            continue
        log.warning("job %s: worker lost, now %s", job_id, new)
        (recovered if new == "queued" else failed).append(job_id)
    waiting = queued_in_broker(broker) if broker is not None else None
    if waiting is not None:  # a message taken a moment ago is not lost; one taken a lease ago is
        waiting |= taken_recently(broker, settings.lease_timeout_s)
    for job_id in store.queued_unsent(settings.reconcile_every_s, now):
        if waiting is not None and job_id in waiting and job_id not in recovered:
            continue  # its message is still in the queue
        try:
            send(store.get(job_id))
            resent.append(job_id)
        except Exception as exc:  # broker down: the next pass tries again
            log.warning("job %s: could not enqueue (%s); will retry", job_id, exc)
            break
    if recovered or resent or failed:
        log.info("reconcile: %d recovered, %d re-sent, %d ended", len(recovered), len(resent), len(failed))
    return {"recovered": recovered, "resent": resent, "ended": failed}


class Reconciler(threading.Thread):
    """A daemon thread in the worker's main process running ``reconcile`` every interval."""

    def __init__(self, make_pass: Callable[[], dict], interval_s: float):
        super().__init__(name="kiln-reconciler", daemon=True)
        self.make_pass, self.interval_s = make_pass, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.make_pass()
            except Exception:  # a store or broker blip must not kill the thread
                log.exception("reconcile pass failed")
            self.stopped.wait(self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
