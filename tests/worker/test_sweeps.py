"""The sweep controller on a real store: a sweep is never taken for a lost job, it ends when its trials
have (succeeded with the best trial, or failed), passes are idempotent, cancel reaches every trial,
and a trial's rung reporter stops it in the bottom of its siblings."""
from __future__ import annotations

import pytest

from configs.sweep import MAX_TRIALS
from worker.errors import Conflict
from worker.reconcile import reconcile
from worker.storage import Storage
from worker.sweeps import RungReporter, advance_sweeps, cancel_sweep, refuse_retry, submit_sweep, summary

SWEEP = {"base": {"data": {"image_size": 8}, "training": {"epochs": 3}},
         "space": {"training.lr": {"values": [0.01, 0.001, 0.0001]}}, "method": "grid", "trials": 3,
         "halving": {"rungs": [1, 2], "keep": 0.5}}


class Facade:
    """What submit_sweep uses of web's Kiln facade; messages are collected instead of sent."""

    def __init__(self, settings, store):
        self.settings, self.store, self.storage, self.sent = settings, store, Storage(settings.storage), []
        self.engine = store.engine

    def _check_dataset(self, cfg) -> None:
        pass

    def _send(self, job: dict) -> None:
        self.sent.append(job["id"])


def submit(db_settings, store) -> tuple[dict, list[dict]]:
    facade = Facade(db_settings, store)
    sweep = store.get(submit_sweep(facade, SWEEP))
    trials = summary(store, sweep)["trials"]
    assert facade.sent == [t["id"] for t in trials]
    return sweep, trials


def finish(store, job_id: str, status: str, **values) -> None:
    assert store.acquire_lease(job_id, "w/1", 60) and store.start(job_id, "w/1", "w")
    if values:
        assert store.update_progress(job_id, "w/1", **values)
    assert store.finish(job_id, "w/1", status, f"test: {status}", error="boom" if status == "failed" else None)


def test_a_sweep_runs_on_no_worker_and_ends_with_its_best_trial(db_settings, store):
    sweep, trials = submit(db_settings, store)
    assert sweep["status"] == "running" and sweep["kind"] == "sweep" and len(trials) == 3
    assert [t["values"]["training.lr"] for t in trials] == [0.01, 0.001, 0.0001]
    assert all(store.get(t["id"])["parent"] == sweep["id"] and t["status"] == "queued" for t in trials)
    assert sweep["id"] not in store.stale_active()  # no lease, yet never "worker lost"
    sent: list = []
    reconcile(store, lambda job: sent.append(job["id"]), db_settings)
    assert store.get(sweep["id"])["status"] == "running" and sweep["id"] not in sent

    finish(store, trials[0]["id"], "succeeded", best={"val_accuracy": 0.95, "epoch": 3})
    assert advance_sweeps(store) == {"sweeps_ended": []}
    assert store.get(sweep["id"])["progress"]["percent"] == pytest.approx(33.3)
    finish(store, trials[1]["id"], "succeeded", best={"val_accuracy": 0.98, "epoch": 3})
    finish(store, trials[2]["id"], "failed")
    assert advance_sweeps(store) == {"sweeps_ended": [sweep["id"]]}
    assert advance_sweeps(store) == {"sweeps_ended": []}  # idempotent: an ended sweep is left alone
    done = store.get(sweep["id"])
    assert done["status"] == "succeeded" and done["metrics_best"] == {"val_accuracy": 0.98, "trial": trials[1]["id"]}
    view = summary(store, done)
    assert view["best"]["id"] == trials[1]["id"] and view["best"]["config"]["training"]["lr"] == 0.001
    assert view["counts"]["succeeded"] == 2 and view["counts"]["failed"] == 1
    with pytest.raises(Conflict):
        refuse_retry(done)


def test_a_sweep_whose_trials_all_failed_fails(db_settings, store):
    sweep, trials = submit(db_settings, store)
    for trial in trials:
        finish(store, trial["id"], "failed")
    advance_sweeps(store)
    done = store.get(sweep["id"])
    assert done["status"] == "failed" and "no trial succeeded" in done["error"]


def test_cancel_reaches_every_unfinished_trial(db_settings, store):
    sweep, trials = submit(db_settings, store)
    finish(store, trials[0]["id"], "succeeded", best={"val_accuracy": 0.9})
    assert store.acquire_lease(trials[1]["id"], "w/2", 60) and store.start(trials[1]["id"], "w/2", "w")
    assert cancel_sweep(store, sweep["id"])["status"] == "cancelled"
    statuses = [store.get(t["id"])["status"] for t in trials]
    assert statuses == ["succeeded", "cancelling", "cancelled"]  # the running one stops at its next step
    with pytest.raises(Conflict):
        cancel_sweep(store, sweep["id"])


def test_a_trial_in_the_bottom_of_its_rung_is_stopped(db_settings, store):
    sweep, trials = submit(db_settings, store)
    for trial, value in zip(trials[:2], (0.9, 0.8)):
        finish(store, trial["id"], "succeeded", progress={"rungs": {"1": value}})
    job_id = trials[2]["id"]
    assert store.acquire_lease(job_id, "w/3", 60) and store.start(job_id, "w/3", "w")
    reporter = RungReporter.for_job(store, store.get(job_id), "w/3")
    assert reporter is not None
    assert reporter.on_epoch({"epoch": 1, "metrics": {"val_accuracy": 0.86}}) is False  # above the median 0.85
    assert store.get(job_id)["status"] == "running"
    assert reporter.on_epoch({"epoch": 2, "metrics": {"val_accuracy": 0.5}}) is False  # nobody else at rung 2
    assert reporter.progress() == {"rungs": {"1": 0.86, "2": 0.5}}

    # a resumed attempt keeps the rungs its last attempt recorded; a low value at rung 1 is stopped
    assert store.update_progress(job_id, "w/3", progress={"rungs": {"2": 0.5}})
    again = RungReporter.for_job(store, store.get(job_id), "w/3")
    assert again.on_epoch({"epoch": 1, "metrics": {"val_accuracy": 0.7}}) is True
    assert again.progress()["rungs"] == {"1": 0.7, "2": 0.5}
    row = store.get(job_id)
    assert row["status"] == "cancelling" and row["cancel_requested"]
    assert again.progress()["stopped"]["epoch"] == 1 and again.progress()["stopped"]["cutoff"] == pytest.approx(0.85)
    assert store.events(job_id)[-1]["reason"].startswith("stopped by successive halving at epoch 1 (val_accuracy 0.7000")


def test_only_a_sweeps_trials_get_a_rung_reporter(db_settings, store):
    job = store.create("train", {"training": {"epochs": 3}})
    assert RungReporter.for_job(store, job, "w/1") is None
    assert MAX_TRIALS == 64


def test_a_sweep_whose_trials_no_live_worker_can_hold_is_refused_naming_its_field(db_settings, store):
    from worker import db
    from worker.clock import utcnow
    from worker.errors import InvalidInput

    with store.engine.begin() as conn:
        conn.execute(db.workers.insert().values(name="gpu-node-1", gpus=2, free_gpus=2, slots=2,
                                                started_at=utcnow(), heartbeat_at=utcnow()))
    facade = Facade(db_settings, store)
    config = {**SWEEP, "base": {**SWEEP["base"], "training": {"epochs": 3, "processes": 4}}}
    with pytest.raises(InvalidInput) as err:
        submit_sweep(facade, config)
    assert [d["field"] for d in err.value.details] == ["base.training.processes"]
    assert store.list(kind="sweep")[1] == 0 and facade.sent == []  # nothing stored, nothing sent
