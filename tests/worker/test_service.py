"""The Kiln facade without a worker: submit (broker down too), logs by offset, metrics, artifacts, health."""
from __future__ import annotations

import dataclasses
import json

import pytest

from configs import ConfigError
from tests.worker.conftest import TINY
from worker.errors import Conflict, InvalidInput, NotFound
from worker.service import Kiln


@pytest.fixture
def kiln(db_settings):
    # a broker that is not there: submit must still succeed and leave the job queued
    k = Kiln(dataclasses.replace(db_settings, redis_url="unix:///tmp/kiln-no-such-redis.sock"))
    yield k
    k.close()


def test_submit_with_the_broker_down_keeps_the_job_queued(kiln):
    job = kiln.submit_job("train", TINY)
    assert job["status"] == "queued" and job["config"]["data"]["image_size"] == 16
    assert kiln.store.queued_unsent(0) == [job["id"]]  # the reconciler will send it
    assert b"image_size: 16" in kiln.storage.read_bytes(f"jobs/{job['id']}/config.yaml")
    assert kiln.list_jobs(status="queued")["total"] == 1
    assert kiln.health()["broker"]["ok"] is False and kiln.health()["store"]["ok"] is True


def test_submit_validates(kiln):
    with pytest.raises(ConfigError) as e:
        kiln.submit_job("train", {"training": {"lr": -1, "epochs": 0}})
    assert {f.field for f in e.value.errors} == {"training.lr", "training.epochs"}
    with pytest.raises(InvalidInput) as e:
        kiln.submit_job("train", {"data": {"dataset": "c" * 32}})
    assert e.value.details[0]["field"] == "data.dataset"


def test_get_cancel_and_not_found(kiln):
    job = kiln.submit_job("train", TINY)
    assert kiln.cancel_job(job["id"])["status"] == "cancelled"
    with pytest.raises(Conflict):
        kiln.cancel_job(job["id"])
    for bad in ("0" * 32, "../etc", "x"):
        with pytest.raises(NotFound):
            kiln.get_job(bad)
    assert [e["to"] for e in kiln.job_events(job["id"])] == ["queued", "cancelled"]


def test_read_log_by_offset(kiln):
    job = kiln.submit_job("train", TINY)
    assert kiln.read_log(job["id"]) == (b"", 0, False)
    kiln.storage.write_bytes(f"jobs/{job['id']}/train.log", b"line one\nline two\npartial")
    data, nxt, finished = kiln.read_log(job["id"])
    assert data == b"line one\nline two\n" and nxt == len(data) and not finished  # the partial line waits
    data, nxt2, _ = kiln.read_log(job["id"], offset=9)
    assert data == b"line two\n" and nxt2 == nxt
    kiln.cancel_job(job["id"])
    data, nxt3, finished = kiln.read_log(job["id"], offset=nxt)
    assert data == b"partial" and finished


def test_metrics_series_from_metrics_jsonl(kiln):
    job = kiln.submit_job("train", TINY)
    rows = [{"type": "step", "step": 1, "loss": 2.0},
            {"type": "epoch", "epoch": 1, "step": 4, "train_loss": 1.0, "val_accuracy": 0.5, "lr": 0.1},
            {"type": "epoch", "epoch": 2, "step": 8, "train_loss": 0.5, "val_accuracy": 0.7, "lr": 0.05}]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"torn'
    kiln.storage.write_bytes(f"jobs/{job['id']}/metrics.jsonl", text.encode())
    m = kiln.job_metrics(job["id"])
    assert [r["epoch"] for r in m["epochs"]] == [1, 2]
    assert m["series"]["train_loss"] == [1.0, 0.5] and m["series"]["lr"] == [0.1, 0.05]


def test_artifacts_list_open_and_traversal(kiln):
    job = kiln.submit_job("train", TINY)
    kiln.storage.write_bytes(f"jobs/{job['id']}/checkpoints/best.pt", b"weights")
    names = {a["name"]: a for a in kiln.list_artifacts(job["id"])}
    assert names["checkpoints/best.pt"]["size"] == 7 and len(names["checkpoints/best.pt"]["sha256"]) == 64
    f, size = kiln.open_artifact(job["id"], "checkpoints/best.pt")
    with f:
        assert f.read() == b"weights" and size == 7
    with pytest.raises(InvalidInput):
        kiln.open_artifact(job["id"], "../../kiln.db")
    with pytest.raises(NotFound):
        kiln.open_artifact(job["id"], "checkpoints")
    with pytest.raises(NotFound):
        kiln.open_artifact(job["id"], "nope.pt")
