"""The executor's bookkeeping with stand-in runners run inline (no torch): lease, outcome, cancel,
transient errors, progress rate, duplicate messages dropped, stale lease taken over; the reconciler.
The job process itself (fork, process group, death) is tested in test_jobproc.py."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import sqlalchemy as sa

from worker import runner
from worker.reconcile import reconcile
from worker.runner import Context, Transient, execute
from worker.storage import Storage
from worker.store import to_dict


@pytest.fixture
def ctx(store, db_settings):
    import dataclasses

    s = dataclasses.replace(db_settings, heartbeat_s=0.05, lease_timeout_s=5.0, progress_every_s=0.05)
    c = Context(s, store, Storage(s.storage), worker_name="test-host", launch="inline")
    c.sent = []
    c.send_message = c.sent.append
    return c


def submit(ctx, kind="train", config=None):
    return ctx.store.create(kind, config or {"data": {"dataset": "digits"}}, max_attempts=2)


def fake_train(steps=5, stop_after=None, error=None):
    def run(job_run):
        (job_run.work_dir / "train.log").write_text("started\n")
        for step in range(1, steps + 1):
            if job_run.should_stop():
                return "stopped"
            job_run.report({"event": "step", "epoch": 1, "epochs": 1, "step": step, "total_steps": steps,
                            "percent": 100.0 * step / steps, "eta_s": 0.0, "metrics": {"train_loss": 1.0 / step},
                            "best": {"val_accuracy": 0.5, "epoch": 1}})
            if error is not None and step == 2:
                raise error
            if stop_after is not None and step == stop_after:
                ctx_cancel = job_run.ctx.store.request_cancel(job_run.job["id"])
                assert ctx_cancel["status"] == "cancelling"
                time.sleep(1.1)  # the cancel check is cached for up to a second
        job_run.report({"event": "end", "epoch": 1, "epochs": 1, "step": steps, "total_steps": steps,
                        "percent": 100.0, "eta_s": 0.0, "metrics": {"train_loss": 0.1}, "best": {}})
        return "completed"
    return run


def test_success_records_progress_and_outcome(ctx):
    job = submit(ctx)
    assert execute(job["id"], ctx, {"train": fake_train()}) == "succeeded"
    d = to_dict(ctx.store.get(job["id"]))
    assert d["status"] == "succeeded" and d["attempts"] == 1 and d["worker"] == "test-host"
    assert d["progress"]["percent"] == 100.0 and d["metrics"]["latest"] == {"train_loss": 0.1}
    assert ctx.store.get(job["id"])["lease_owner"] is None
    assert (ctx.storage.local_path(f"jobs/{job['id']}") / "train.log").exists()


def test_value_error_fails_the_job_with_its_message(ctx):
    job = submit(ctx)
    out = execute(job["id"], ctx, {"train": fake_train(error=ValueError("loss is NaN; lower the lr"))})
    assert out == "failed"
    row = ctx.store.get(job["id"])
    assert row["status"] == "failed" and row["error"] == "loss is NaN; lower the lr"


def test_unexpected_error_fails_with_its_type(ctx):
    job = submit(ctx)
    assert execute(job["id"], ctx, {"train": fake_train(error=RuntimeError("CUDA OOM"))}) == "failed"
    assert ctx.store.get(job["id"])["error"] == "RuntimeError: CUDA OOM"


def test_transient_error_requeues_and_asks_for_a_retry(ctx):
    job = submit(ctx)
    with pytest.raises(Transient):
        execute(job["id"], ctx, {"train": fake_train(error=sa.exc.OperationalError("x", {}, Exception("gone")))})
    row = ctx.store.get(job["id"])
    assert row["status"] == "queued" and row["attempts"] == 1 and row["lease_owner"] is None
    assert execute(job["id"], ctx, {"train": fake_train()}) == "succeeded"
    assert ctx.store.get(job["id"])["attempts"] == 2


def test_cancel_while_running_stops_at_a_step_boundary(ctx):
    job = submit(ctx)
    assert execute(job["id"], ctx, {"train": fake_train(steps=50, stop_after=2)}) == "cancelled"
    row = ctx.store.get(job["id"])
    assert row["status"] == "cancelled" and row["progress"]["step"] < 50


def test_terminal_and_unknown_jobs_are_dropped(ctx):
    job = submit(ctx)
    ctx.store.request_cancel(job["id"])
    assert execute(job["id"], ctx, {"train": fake_train()}) == "dropped: cancelled"
    assert execute("0" * 32, ctx, {"train": fake_train()}) == "dropped: unknown job"


def test_duplicate_message_for_a_live_lease_is_dropped(ctx):
    job = submit(ctx)
    started, release = threading.Event(), threading.Event()

    def slow(job_run):
        started.set()
        release.wait(10)
        return "completed"

    t = threading.Thread(target=execute, args=(job["id"], ctx, {"train": slow}))
    t.start()
    assert started.wait(10)
    assert execute(job["id"], ctx, {"train": fake_train()}) == "dropped: leased"
    release.set()
    t.join()
    assert ctx.store.get(job["id"])["attempts"] == 1


def test_stale_lease_is_taken_over_and_counts_an_attempt(ctx):
    job = submit(ctx)
    ctx.store.acquire_lease(job["id"], "dead-worker", -1)
    ctx.store.start(job["id"], "dead-worker", "gone-host")
    assert execute(job["id"], ctx, {"train": fake_train()}) == "succeeded"
    row = ctx.store.get(job["id"])
    assert row["attempts"] == 2
    assert [e["to"] for e in ctx.store.events(job["id"])] == ["queued", "running", "queued", "running",
                                                               "succeeded"]


def test_progress_writes_are_rate_limited(ctx, monkeypatch):
    job = submit(ctx)
    calls = []
    real = ctx.store.update_progress
    monkeypatch.setattr(ctx.store, "update_progress", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    import dataclasses

    ctx.settings = dataclasses.replace(ctx.settings, progress_every_s=60.0)
    execute(job["id"], ctx, {"train": fake_train(steps=200)})
    assert 2 <= len(calls) <= 3  # the first step, the end event, the final flush: not one per step
    assert ctx.store.get(job["id"])["progress"]["step"] == 200  # and the last report still lands


def test_log_records_carry_the_job_id(ctx, caplog):
    job = submit(ctx)
    seen = []

    def run(job_run):
        logging.getLogger("kiln.test").warning("inside")
        return "completed"

    with caplog.at_level(logging.INFO):
        execute(job["id"], ctx, {"train": run})
    seen = [r.job_id for r in caplog.records if r.name == "kiln.test"]
    assert seen == [job["id"]]


def test_missing_uploaded_dataset_fails_with_a_fix(ctx):
    job = submit(ctx, config={"data": {"dataset": "a" * 32}})
    assert execute(job["id"], ctx, {"train": fake_train()}) == "failed"
    assert "POST /v1/datasets" in ctx.store.get(job["id"])["error"]


def test_uploaded_dataset_resolves_to_its_folder(ctx):
    ds = "b" * 32
    ctx.storage.write_bytes(f"datasets/{ds}/cat/1.png", b"x")
    job = submit(ctx, config={"data": {"dataset": ds}})
    roots = {}
    execute(job["id"], ctx, {"train": lambda r: (roots.update(r.dataset_roots), "completed")[1]})
    assert roots == {ds: str(ctx.storage.local_path(f"datasets/{ds}"))}


# ------------------------------------------------------------------ reconciler
def test_reconcile_recovers_stale_jobs_and_resends_lost_messages(ctx):
    stale = submit(ctx)
    ctx.store.acquire_lease(stale["id"], "dead", -1)
    ctx.store.start(stale["id"], "dead", "h")
    lost = submit(ctx)  # never sent (broker was down at submit)
    live = submit(ctx)
    ctx.store.acquire_lease(live["id"], "alive", 60)
    ctx.store.start(live["id"], "alive", "h")
    out = reconcile(ctx.store, ctx.send, ctx.settings)
    assert out["recovered"] == [stale["id"]] and set(out["resent"]) == {stale["id"], lost["id"]}
    assert ctx.store.get(stale["id"])["status"] == "queued"
    assert ctx.store.get(live["id"])["status"] == "running"
    again = reconcile(ctx.store, ctx.send, ctx.settings)  # idempotent: nothing left to do
    assert again == {"recovered": [], "resent": [], "ended": []}


def test_reconcile_survives_a_broker_outage(ctx):
    submit(ctx)

    def down(job):
        raise ConnectionError("broker down")

    assert reconcile(ctx.store, down, ctx.settings)["resent"] == []
    assert ctx.store.queued_unsent(0)  # still waiting for the next pass


def test_runner_registry_has_train_and_predict():
    assert {"train", "predict"} <= set(runner.RUNNERS)
