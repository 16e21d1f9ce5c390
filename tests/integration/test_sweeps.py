"""Sweeps over HTTP against the real stack (one worker slot, as the embedded default has): trials are
child training jobs that queue behind each other; the same config draws the same trials; cancelling
a sweep cancels its trials; a random sweep with successive halving on digits finds a trial at >= 97%
and marks the trials it stopped."""
from __future__ import annotations

import time

import pytest
import requests

pytestmark = pytest.mark.integration

# small_cnn on the 8x8 digits at their own size: an epoch takes seconds of CPU
BASE = {"data": {"image_size": 8}, "training": {"epochs": 3}}
# seed 7 draws lr 7e-3, 9e-4, 2.9e-3, 1.3e-4, 5.4e-3, 1.3e-5 (batch 64, 64, 32, 32, 32, 32): weak trials
# come after two others have recorded rung 1, so halving has something to compare them with
SWEEP = {"base": BASE, "space": {"training.lr": {"log_uniform": [1e-5, 1e-2]},
                                 "training.batch_size": {"values": [32, 64]}},
         "method": "random", "trials": 6, "seed": 7, "metric": "val_accuracy", "mode": "max",
         "halving": {"rungs": [1, 2], "keep": 0.5}}


def submit_sweep(s, config: dict) -> dict:
    r = requests.post(s.url("/v1/jobs"), json={"kind": "sweep", "config": config}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def trials_of(s, sweep_id: str) -> list[dict]:
    r = requests.get(s.url("/v1/jobs"), params={"parent": sweep_id, "limit": 200}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["jobs"]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def test_a_bad_sweep_is_refused_naming_the_sweep_field(live_service):
    bad = {**SWEEP, "space": {"training.lr": {"values": [100]}, "training.nope": {"values": [1]}}}
    r = requests.post(live_service.url("/v1/jobs"), json={"kind": "sweep", "config": bad}, timeout=30)
    assert r.status_code == 422, r.text
    assert {d["field"] for d in r.json()["error"]["details"]} == {"space.training.nope"}
    bad = {**SWEEP, "space": {"training.lr": {"values": [100]}}}
    r = requests.post(live_service.url("/v1/jobs"), json={"kind": "sweep", "config": bad}, timeout=30)
    assert r.status_code == 422 and [d["field"] for d in r.json()["error"]["details"]] == ["space.training.lr"]
    assert requests.get(live_service.url("/v1/jobs"), params={"kind": "sweep"}, timeout=30).json()["total"] == 0


def test_the_same_config_draws_the_same_trials_and_cancel_cancels_them(live_service):
    s = live_service
    config = {**SWEEP, "base": {**BASE, "training": {"epochs": 200}}, "halving": None, "trials": 3, "seed": 11}
    first, second = submit_sweep(s, config), submit_sweep(s, config)
    assert first["kind"] == "sweep" and first["status"] == "running"  # a sweep holds no worker slot
    drawn = [[t["values"] for t in sweep["sweep"]["trials"]] for sweep in (first, second)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 3
    assert len({t["training.lr"] for t in drawn[0]}) == 3
    listed = trials_of(s, first["id"])
    assert {t["id"] for t in listed} == {t["id"] for t in first["sweep"]["trials"]}
    assert all(t["parent"] == first["id"] and t["kind"] == "train" for t in listed)
    by_id = {t["id"]: t for t in listed}
    for trial in first["sweep"]["trials"]:
        assert by_id[trial["id"]]["config"]["training"]["lr"] == trial["values"]["training.lr"]

    # the first trial of the first sweep takes the one worker slot; the rest queue behind it
    wait_until(lambda: any(t["status"] == "running" for t in trials_of(s, first["id"])), 300, "no trial started")
    for sweep in (first, second):
        r = requests.post(s.url(f"/v1/jobs/{sweep['id']}/cancel"), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
    for sweep in (first, second):
        trials = wait_until(lambda: (lambda ts: ts if all(t["status"] == "cancelled" for t in ts) else None)(
            trials_of(s, sweep["id"])), 300, "trials not cancelled")
        assert len(trials) == 3
        assert s.job(sweep["id"])["status"] == "cancelled"
    r = requests.post(s.url(f"/v1/jobs/{first['id']}/cancel"), timeout=30)
    assert r.status_code == 409


def test_a_random_sweep_with_halving_finds_a_good_trial_and_marks_the_stopped_ones(live_service):
    s = live_service
    sweep = submit_sweep(s, SWEEP)
    assert sweep["status"] == "running" and sweep["sweep"]["total"] == 6
    done = s.wait(sweep["id"], timeout=2400)
    assert done["status"] == "succeeded", done
    view = done["sweep"]
    trials = view["trials"]
    assert len(trials) == 6 and all(t["status"] in ("succeeded", "cancelled") for t in trials), trials

    best = view["best"]
    assert best["metric"] >= 0.97, view
    assert best["metric"] == max(t["metric"] for t in trials if t["status"] == "succeeded")
    assert done["metrics"]["best"] == {"val_accuracy": best["metric"], "trial": best["id"]}
    best_job = s.job(best["id"])
    assert best_job["status"] == "succeeded" and best_job["metrics"]["best"]["val_accuracy"] == best["metric"]
    assert best["config"] == best_job["config"] and best_job["parent"] == sweep["id"]

    stopped = [t for t in trials if t["stopped"]]
    assert stopped, trials  # lr 1.3e-4 and 1.3e-5 cannot keep up at rung 1
    for trial in stopped:
        assert trial["status"] == "cancelled"
        assert trial["stop_reason"].startswith("stopped by successive halving at epoch ")
        job = s.job(trial["id"])
        assert job["stopped"]["by"] == "successive_halving" and job["stopped"]["epoch"] in (1, 2)
        assert job["stopped"]["reason"] == trial["stop_reason"]
        metrics = requests.get(s.url(f"/v1/jobs/{trial['id']}/metrics"), timeout=30).json()
        assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, job["stopped"]["epoch"] + 1))
        # it was in the bottom half of what two or more others recorded at its rung
        rung = str(job["stopped"]["epoch"])
        others = [t["rungs"][rung] for t in trials if t["id"] != trial["id"] and rung in t["rungs"]]
        assert len(others) >= 2 and job["stopped"]["metric"] < job["stopped"]["cutoff"] <= max(others)
    assert view["counts"]["stopped"] == len(stopped)
    assert all(not t["stopped"] for t in trials if t["status"] == "succeeded")
