"""Train to production in one job, over HTTP against the real stack: a training config ending with
``register`` makes a model version (gate and metrics recorded, alias moved) when the job passes its
gate, and says why not when it does not."""
from __future__ import annotations

import time

import pytest
import requests

pytestmark = pytest.mark.integration
BASE = {"data": {"image_size": 8}, "training": {"batch_size": 32, "lr": 5e-3}}


def wait_promotion(s, job_id: str, timeout: float = 300) -> dict:
    """The job once it ended and, when it succeeded, once its promotion outcome is recorded."""
    job = s.wait(job_id, timeout=900)
    deadline = time.monotonic() + timeout
    while job["status"] == "succeeded" and job["promotion"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
        job = s.job(job_id)
    return job


def test_a_job_that_passes_its_gate_becomes_the_next_version_and_moves_the_alias(live_service):
    s = live_service
    config = {**BASE, "training": {**BASE["training"], "epochs": 2},
              "register": {"name": "digits-gated", "alias": "production", "require": {"val_accuracy": {"min": 0.8}}}}
    job = wait_promotion(s, s.submit(config)["id"])
    assert job["status"] == "succeeded", job
    best = job["metrics"]["best"]["val_accuracy"]
    assert best >= 0.8, job
    promotion = job["promotion"]
    assert promotion["promoted"] is True and promotion["name"] == "digits-gated", promotion
    assert promotion["version"] == 1 and promotion["alias"] == "production"

    model = requests.get(s.url("/v1/models/digits-gated"), timeout=30).json()
    assert model["aliases"] == {"production": 1}
    (version,) = model["versions"]
    assert version["job_id"] == job["id"] and version["aliases"] == ["production"]
    assert version["gate"]["require"] == {"val_accuracy": {"min": 0.8}}
    assert version["gate"]["metrics"]["val_accuracy"] == pytest.approx(best)
    assert version["gate"]["job_id"] == job["id"]

    log = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert "promoted: digits-gated version 1, alias production moved to it" in log

    # the promoted version serves: /predict by the alias answers with version 1
    r = requests.post(s.url("/predict"), params={"model": "digits-gated@production"},
                      json={"instances": [[[0] * 8] * 8]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["version"] == 1


def test_a_job_that_fails_its_gate_succeeds_and_says_why_it_was_not_promoted(live_service):
    s = live_service
    config = {**BASE, "training": {**BASE["training"], "epochs": 1},
              "register": {"name": "digits-strict", "alias": "production",
                           "require": {"val_accuracy": {"min": 0.9999}}}}
    job = wait_promotion(s, s.submit(config)["id"])
    assert job["status"] == "succeeded" and job["error"] is None, job
    best = job["metrics"]["best"]["val_accuracy"]
    assert best < 0.9999
    promotion = job["promotion"]
    assert promotion["promoted"] is False, promotion
    assert promotion["reason"] == f"val_accuracy {best:.4g} < min 0.9999", promotion

    r = requests.get(s.url("/v1/models/digits-strict"), timeout=30)
    assert r.status_code == 404  # no version was made
    log = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert f"not promoted: val_accuracy {best:.4g} < min 0.9999" in log


def test_a_bad_gate_is_refused_naming_the_field(live_service):
    r = requests.post(live_service.url("/v1/jobs"), json={"config": {
        "register": {"name": "d", "require": {"accuracy": {"min": 0.9}}}}}, timeout=30)
    assert r.status_code == 422, r.text
    assert [d["field"] for d in r.json()["error"]["details"]] == ["register.require"]
