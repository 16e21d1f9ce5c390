"""Logs (offsets, follow), metrics and artifacts of a job, read from real local storage."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from tests.api.conftest import error_of
from tests.conftest import running_app

LOG = "".join(f"epoch {i}: loss {1 / (i + 1):.3f}\n" for i in range(50)).encode()


@pytest.fixture
def job_dir(job, api_settings) -> Path:
    """What a worker would have written for ``job`` (the DESIGN storage layout), in the real storage."""
    root = Path(api_settings.storage) / "jobs" / job["id"]
    (root / "checkpoints").mkdir(parents=True)
    (root / "train.log").write_bytes(LOG)
    # rows shaped as ml.train writes them: "step" rows while an epoch runs, an "epoch" row at its end;
    # epoch 3 is still running, so it has step rows only
    rows = []
    for e in (1, 2, 3):
        rows.append({"type": "step", "epoch": e, "step": 10 * e - 5, "train_loss": 9.0, "lr": 1e-3,
                     "grad_norm": 3.0, "layer_grad_norms": {"fc": 1.0}})
        if e < 3:
            rows.append({"type": "epoch", "epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                         "val_accuracy": 0.5 + e / 10, "lr": 1e-3, "grad_norm": 0.5, "images_per_s": 100.0})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "config.yaml").write_text("model: {name: small_cnn}\n")
    (root / "checkpoints" / "best.pt").write_bytes(bytes(range(256)) * 40)
    return root


def test_logs_from_offsets(client, job, job_dir):
    resp = client.get(f"/v1/jobs/{job['id']}/logs")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    assert resp.data == LOG and int(resp.headers["X-Next-Offset"]) == len(LOG)
    part = client.get(f"/v1/jobs/{job['id']}/logs?offset=100")
    assert part.data == LOG[100:] and int(part.headers["X-Next-Offset"]) == len(LOG)
    end = client.get(f"/v1/jobs/{job['id']}/logs?offset={len(LOG)}")
    assert end.data == b"" and int(end.headers["X-Next-Offset"]) == len(LOG)
    with open(job_dir / "train.log", "ab") as f:  # the log grows: the next read starts where we stopped
        f.write(b"more\n")
    assert client.get(f"/v1/jobs/{job['id']}/logs?offset={len(LOG)}").data == b"more\n"


def test_log_of_a_job_without_log_is_empty(client, job):
    resp = client.get(f"/v1/jobs/{job['id']}/logs")
    assert resp.status_code == 200 and resp.data == b"" and resp.headers["X-Next-Offset"] == "0"


@pytest.mark.parametrize("query", ["offset=-1", "offset=abc", "offset=", "offset=1e3", "follow=maybe"])
def test_bad_log_query_is_400(client, job, query):
    err = error_of(client.get(f"/v1/jobs/{job['id']}/logs?{query}"), 400)
    assert err["details"][0]["field"] in ("offset", "follow")


def test_follow_streams_until_the_job_is_finished(client, job, job_dir):
    client.post(f"/v1/jobs/{job['id']}/cancel")  # a finished job: follow drains the log and ends
    resp = client.get(f"/v1/jobs/{job['id']}/logs?offset=10&follow=1")
    assert resp.status_code == 200 and resp.is_streamed
    assert resp.data == LOG[10:]


def test_follow_of_a_live_job_stops_at_max_duration(api_settings, job, job_dir):
    short = dataclasses.replace(api_settings, log_poll_s=0.05, log_follow_max_s=0.3)
    with running_app(short) as app:  # the job stays queued (no worker): bounded by the max
        resp = app.test_client().get(f"/v1/jobs/{job['id']}/logs?follow=1")
    assert resp.data == LOG


def test_metrics(client, job, job_dir):
    resp = client.get(f"/v1/jobs/{job['id']}/metrics")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert [(row["type"], row["epoch"]) for row in body["epochs"]] == [("epoch", 1), ("epoch", 2)]
    assert body["series"]["train_loss"] == [1.0, 0.5] and body["series"]["val_accuracy"] == [0.6, 0.7]


def test_artifacts_list_and_download(client, job, job_dir):
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts").get_json()["artifacts"]
    by_name = {a["name"]: a for a in listed}
    assert {"train.log", "metrics.jsonl", "config.yaml", "checkpoints/best.pt"} <= set(by_name)
    best = (job_dir / "checkpoints" / "best.pt").read_bytes()
    assert by_name["checkpoints/best.pt"] == {"name": "checkpoints/best.pt", "size": len(best),
                                             "sha256": hashlib.sha256(best).hexdigest()}
    resp = client.get(f"/v1/jobs/{job['id']}/artifacts/checkpoints/best.pt")
    assert resp.status_code == 200 and resp.data == best
    assert int(resp.headers["Content-Length"]) == len(best)
    assert "best.pt" in resp.headers["Content-Disposition"]
    error_of(client.get(f"/v1/jobs/{job['id']}/artifacts/checkpoints/none.pt"), 404)


@pytest.mark.parametrize("name", [
    "../../kiln.db", "..%2F..%2Fkiln.db", "checkpoints/../../x", "%2Fetc%2Fpasswd", "/etc/passwd",
    "a//b", "./train.log", "..\\..\\kiln.db", "checkpoints/%00.pt",
])
def test_artifact_traversal_is_refused(client, job, job_dir, name):
    resp = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert resp.status_code in (400, 404), (name, resp.status_code)
    error_of(resp, resp.status_code)
    assert b"SQLite" not in resp.data and b"root:" not in resp.data
