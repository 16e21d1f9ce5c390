"""JobStore: guarded compare-and-set transitions, events, leases, progress, cancel, listing."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from worker.errors import Conflict, NotFound
from worker.store import JobStore, to_dict, utcnow


def new(store, **kw):
    return store.create("train", {"x": 1}, max_attempts=kw.pop("max_attempts", 3))


def test_create_get_and_shape(store):
    job = to_dict(new(store))
    assert job["status"] == "queued" and job["attempts"] == 0 and len(job["id"]) == 32
    assert set(job) >= {"id", "kind", "status", "attempts", "progress", "metrics", "config", "error", "worker",
                        "created_at", "started_at", "finished_at"}
    assert set(job["progress"]) == {"epoch", "epochs", "step", "total_steps", "percent", "eta_s"}
    assert job["created_at"].endswith("Z") and job["finished_at"] is None
    with pytest.raises(NotFound):
        store.get("0" * 32)


def test_lifecycle_records_every_reason(store):
    job = new(store)
    assert store.acquire_lease(job["id"], "w1", 30)
    assert store.start(job["id"], "w1", "host-a")
    row = store.get(job["id"])
    assert row["status"] == "running" and row["attempts"] == 1 and row["worker"] == "host-a"
    assert store.finish(job["id"], "w1", "succeeded", "completed after 10 steps")
    events = store.events(job["id"])
    assert [(e["from"], e["to"]) for e in events] == [(None, "queued"), ("queued", "running"),
                                                       ("running", "succeeded")]
    assert events[-1]["reason"] == "completed after 10 steps"
    row = store.get(job["id"])
    assert row["lease_owner"] is None and row["finished_at"] is not None


def test_no_transition_out_of_a_terminal_state(store):
    job = new(store)
    store.acquire_lease(job["id"], "w1", 30)
    store.start(job["id"], "w1", "h")
    store.finish(job["id"], "w1", "succeeded", "done")
    for to in ("running", "queued", "failed", "cancelled"):
        assert not store.transition(job["id"], to, "nope")
    assert store.get(job["id"])["status"] == "succeeded"
    assert not store.transition(new(store)["id"], "succeeded", "queued->succeeded skips running")


def test_only_one_of_many_concurrent_transitions_wins(store):
    job = new(store)
    results, barrier = [], threading.Barrier(8)

    def attempt(i):
        barrier.wait()
        results.append(store.transition(job["id"], "cancelled", f"racer {i}", expect=("queued",)))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert [e["to"] for e in store.events(job["id"])].count("cancelled") == 1


def test_lease_is_exclusive_until_it_expires(store):
    job = new(store)
    assert store.acquire_lease(job["id"], "w1", 30)
    assert not store.acquire_lease(job["id"], "w2", 30)
    assert store.acquire_lease(job["id"], "w1", 30)  # re-entrant for its owner
    assert store.heartbeat(job["id"], "w1", 30) and not store.heartbeat(job["id"], "w2", 30)
    assert store.acquire_lease(job["id"], "w3", -1) is False
    store.release_lease(job["id"], "w1")
    assert store.acquire_lease(job["id"], "w2", -1)  # expired at once: the next taker wins
    assert store.acquire_lease(job["id"], "w3", 30)
    assert not store.heartbeat(job["id"], "w2", 30)


def test_start_needs_the_lease(store):
    job = new(store)
    store.acquire_lease(job["id"], "w1", 30)
    assert not store.start(job["id"], "intruder", "h")
    assert store.start(job["id"], "w1", "h")


def test_worker_loss_requeues_then_fails_after_max_attempts(store):
    job = new(store, max_attempts=2)
    for attempt in (1, 2):
        assert store.acquire_lease(job["id"], f"w{attempt}", -1)  # a lease that is already stale
        assert store.start(job["id"], f"w{attempt}", "h")
        assert store.stale_active() == [job["id"]]
        expected = "queued" if attempt == 1 else "failed"
        assert store.requeue_lost(job["id"], "worker lost") == expected
    row = store.get(job["id"])
    assert row["status"] == "failed" and row["attempts"] == 2 and "max_attempts" in row["error"]
    assert [e["to"] for e in store.events(job["id"])] == ["queued", "running", "queued", "running", "failed"]


def test_live_lease_is_not_recovered(store):
    job = new(store)
    store.acquire_lease(job["id"], "w1", 30)
    store.start(job["id"], "w1", "h")
    assert store.stale_active() == []
    assert store.requeue_lost(job["id"], "should not happen") is None
    assert store.get(job["id"])["status"] == "running"


def test_cancel_queued_is_immediate_and_running_goes_through_cancelling(store):
    queued = new(store)
    assert store.request_cancel(queued["id"])["status"] == "cancelled"
    with pytest.raises(Conflict):
        store.request_cancel(queued["id"])
    running = new(store)
    store.acquire_lease(running["id"], "w", 30)
    store.start(running["id"], "w", "h")
    row = store.request_cancel(running["id"])
    assert row["status"] == "cancelling" and store.cancel_requested(running["id"])
    assert store.request_cancel(running["id"])["status"] == "cancelling"  # idempotent
    assert store.finish(running["id"], "w", "cancelled", "stopped at step 3")
    assert [e["to"] for e in store.events(running["id"])][-2:] == ["cancelling", "cancelled"]


def test_cancelling_job_whose_worker_died_ends_cancelled(store):
    job = new(store)
    store.acquire_lease(job["id"], "w", -1)
    store.start(job["id"], "w", "h")
    store.request_cancel(job["id"])
    assert store.requeue_lost(job["id"], "worker lost") == "cancelled"


def test_progress_only_from_the_lease_holder(store):
    job = new(store)
    store.acquire_lease(job["id"], "w", 30)
    store.start(job["id"], "w", "h")
    p = {"epoch": 1, "epochs": 2, "step": 5, "total_steps": 10, "percent": 50.0, "eta_s": 1.5}
    assert store.update_progress(job["id"], "w", p, {"train_loss": 0.5}, {"val_accuracy": 0.9, "epoch": 1})
    assert not store.update_progress(job["id"], "other", {"step": 99})
    d = to_dict(store.get(job["id"]))
    assert d["progress"] == p and d["metrics"]["latest"] == {"train_loss": 0.5}
    assert d["metrics"]["best"]["val_accuracy"] == 0.9


def test_list_filters_and_paginates(store):
    ids = [new(store)["id"] for _ in range(5)]
    store.request_cancel(ids[0])
    rows, total = store.list(limit=2, offset=0)
    assert total == 5 and len(rows) == 2
    rows, total = store.list(status="cancelled")
    assert total == 1 and rows[0]["id"] == ids[0]
    rows, total = store.list(status="queued", kind="train", limit=10, offset=3)
    assert total == 4 and len(rows) == 1
    assert store.list(kind="predict")[1] == 0


def test_queued_unsent_and_mark_enqueued(store):
    job = new(store)
    assert store.queued_unsent(60) == [job["id"]]
    store.mark_enqueued(job["id"])
    assert store.queued_unsent(60) == []
    assert store.queued_unsent(60, now=utcnow() + timedelta(seconds=120)) == [job["id"]]


def test_two_stores_one_database_share_the_cas(db_settings):
    """Two engines (as two processes would have) cannot both take a lease or both start a job."""
    import threading

    from worker.db import create_engine

    a = JobStore.from_settings(db_settings)
    b = JobStore(create_engine(db_settings.db_url))
    try:
        assert a.engine is not b.engine
        job = a.create("train", {}, max_attempts=3)
        assert a.acquire_lease(job["id"], "A", 30) and not b.acquire_lease(job["id"], "B", 30)
        assert not b.start(job["id"], "B", "h") and a.start(job["id"], "A", "h")
        row = b.get(job["id"])  # b reads what a wrote
        assert (row["status"], row["lease_owner"], row["attempts"]) == ("running", "A", 1)
        assert [e["to"] for e in b.events(job["id"])] == ["queued", "running"]

        # the lease goes stale; both stores race to take it over at the same moment: one wins
        a.release_lease(job["id"], "A")
        barrier, won = threading.Barrier(2), {}

        def take(store, owner):
            barrier.wait()
            won[owner] = store.acquire_lease(job["id"], owner, 30)

        threads = [threading.Thread(target=take, args=(s, o)) for s, o in ((a, "A2"), (b, "B2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(won.values()) == [False, True]
        assert a.get(job["id"])["lease_owner"] == next(o for o, ok in won.items() if ok)
    finally:
        b.engine.dispose()


def _race_once(store, outcome: str):
    """A running job; one thread requests a cancel while the lease holder records ``outcome``."""
    job = new(store)
    assert store.acquire_lease(job["id"], "w", 30) and store.start(job["id"], "w", "host")
    barrier, answers = threading.Barrier(2), {}

    def cancel():
        barrier.wait()
        try:
            answers["cancel"] = store.request_cancel(job["id"])["status"]
        except Conflict:
            answers["cancel"] = "conflict"

    def finish():
        barrier.wait()
        answers["finish"] = store.finish(job["id"], "w", outcome, f"{outcome} after 8 steps")

    threads = [threading.Thread(target=cancel), threading.Thread(target=finish)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return job["id"], answers


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_cancel_racing_finish_ends_in_the_runs_outcome(store, outcome):
    """Whichever reaches the store first, the job ends in what the run did (never 'worker lost'):
    a cancel that came first is overtaken by the finish, one that came last answers 409."""
    seen = set()
    for _ in range(40):
        job_id, answers = _race_once(store, outcome)
        row = store.get(job_id)
        assert answers["finish"] is True, answers
        assert row["status"] == outcome and row["lease_owner"] is None and not row["cancel_requested"]
        # the cancel's answer is the job as it read it back: cancelling, or already overtaken
        assert answers["cancel"] in ("cancelling", outcome, "conflict"), answers
        path = [(e["from"], e["to"]) for e in store.events(job_id)]
        if answers["cancel"] == "conflict":
            assert path[-1] == ("running", outcome)
        else:
            assert path[-2:] == [("running", "cancelling"), ("cancelling", outcome)]
            assert "cancel was requested" in store.events(job_id)[-1]["reason"]
        seen.add("conflict" if answers["cancel"] == "conflict" else "cancel first")
        # nothing is left for the reconciler to call lost
        assert job_id not in store.stale_active(now=utcnow() + timedelta(hours=1))
        assert store.requeue_lost(job_id, "worker lost") is None
    assert seen  # the orderings met (both appear over a few runs on most machines)


def test_finish_after_a_cancel_request_keeps_the_outcome(store):
    """The deterministic ordering of the race: cancel first, then the run's own finish."""
    job = new(store)
    store.acquire_lease(job["id"], "w", 30)
    store.start(job["id"], "w", "host")
    assert store.request_cancel(job["id"])["status"] == "cancelling"
    assert store.finish(job["id"], "w", "succeeded", "completed")
    assert store.get(job["id"])["status"] == "succeeded"
    with pytest.raises(Conflict):
        store.request_cancel(job["id"])
    # a worker that stopped for the cancel ends cancelled, as before
    job = new(store)
    store.acquire_lease(job["id"], "w", 30)
    store.start(job["id"], "w", "host")
    store.request_cancel(job["id"])
    assert store.finish(job["id"], "w", "cancelled", "cancelled at step 3")
    assert store.get(job["id"])["status"] == "cancelled"
    # a holder that lost its lease decides nothing
    job = new(store)
    store.acquire_lease(job["id"], "w", 30)
    store.start(job["id"], "w", "host")
    store.release_lease(job["id"], "w")
    assert not store.finish(job["id"], "w", "succeeded", "late")
    assert store.get(job["id"])["status"] == "running"
