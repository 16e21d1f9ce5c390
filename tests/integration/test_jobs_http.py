"""Through HTTP against a real Redis, a real Celery worker and gunicorn: train, logs, metrics,
artifacts, cancel, validation."""
from __future__ import annotations

import io
import time

import pytest
import requests

from tests.integration.conftest import TINY

pytestmark = pytest.mark.integration


def test_train_job_end_to_end(live_service):
    s = live_service
    job = s.submit()
    assert job["status"] == "queued" and job["attempts"] == 0
    done = s.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None and done["worker"]
    assert done["progress"]["percent"] == 100.0 and done["progress"]["step"] == done["progress"]["total_steps"]
    assert 0.0 <= done["metrics"]["best"]["val_accuracy"] <= 1.0
    assert done["started_at"] and done["finished_at"] >= done["started_at"]

    # logs by byte offset: the two halves are the whole
    r = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), params={"offset": 0}, timeout=30)
    whole = r.content
    assert r.status_code == 200 and b"epoch 2/2" in whole
    assert int(r.headers["X-Next-Offset"]) == len(whole)
    half = len(whole) // 2
    tail = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), params={"offset": half}, timeout=30)
    assert whole[:half] + tail.content == whole

    metrics = requests.get(s.url(f"/v1/jobs/{job['id']}/metrics"), timeout=30).json()
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    for name in ("train_loss", "val_loss", "val_accuracy"):
        assert len(metrics["series"][name]) == 2

    arts = requests.get(s.url(f"/v1/jobs/{job['id']}/artifacts"), timeout=30).json()
    arts = arts["artifacts"] if isinstance(arts, dict) else arts
    names = {a["name"]: a for a in arts}
    assert {"config.yaml", "train.log", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"} <= set(names)
    r = requests.get(s.url(f"/v1/jobs/{job['id']}/artifacts/checkpoints/best.pt"), timeout=30)
    assert r.status_code == 200 and len(r.content) == names["checkpoints/best.pt"]["size"]
    import hashlib

    import torch

    assert hashlib.sha256(r.content).hexdigest() == names["checkpoints/best.pt"]["sha256"]
    ckpt = torch.load(io.BytesIO(r.content), weights_only=True)
    assert ckpt["epoch"] >= 1 and len(ckpt["classes"]) == 10 and "model" in ckpt


def test_cancel_a_queued_job_and_a_running_job(live_service):
    s = live_service
    long = {**TINY, "training": {**TINY["training"], "epochs": 200}}
    running = s.submit(long)
    queued = s.submit()  # one worker process: this one waits behind the long job
    s.wait(running["id"], statuses=("running",), timeout=60)
    r = requests.post(s.url(f"/v1/jobs/{queued['id']}/cancel"), timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while s.job(running["id"])["progress"]["step"] in (None, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    r = requests.post(s.url(f"/v1/jobs/{running['id']}/cancel"), timeout=30)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    done = s.wait(running["id"], timeout=60)
    assert done["status"] == "cancelled" and done["finished_at"]
    arts = requests.get(s.url(f"/v1/jobs/{running['id']}/artifacts"), timeout=30).json()
    arts = arts["artifacts"] if isinstance(arts, dict) else arts
    assert "checkpoints/last.pt" in {a["name"] for a in arts}  # stopped at a step boundary with a checkpoint
    assert requests.post(s.url(f"/v1/jobs/{running['id']}/cancel"), timeout=30).status_code == 409
    # the cancelled queued job's message is dropped, never run
    assert s.job(queued["id"])["status"] == "cancelled" and s.job(queued["id"])["attempts"] == 0


def test_bad_config_is_422_naming_each_field(live_service):
    bad = {"model": {"name": "resnet9000"}, "data": {"image_size": 2}, "training": {"lr": -1, "bogus": 1}}
    r = requests.post(live_service.url("/v1/jobs"), json={"kind": "train", "config": bad}, timeout=30)
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert {"model.name", "data.image_size", "training.lr", "training.bogus"} <= fields
    r = requests.post(live_service.url("/v1/jobs"), timeout=30,
                      json={"kind": "train", "config": {"data": {"dataset": "f" * 32}}})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "data.dataset"


def test_ready_checks_every_dependency(live_service):
    r = requests.get(live_service.url("/ready"), timeout=30)
    assert r.status_code == 200, r.text


def _digits_zip(n: int = 120, extra: dict[str, bytes] | None = None) -> bytes:
    """A real ImageFolder zip: sklearn's digits rendered to PNG under <label>/<k>.png."""
    import numpy as np
    import zipfile
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k in range(n):
            png = io.BytesIO()
            Image.fromarray(np.rint(d.images[k] * 255 / 16).astype(np.uint8), "L").save(png, "PNG")
            z.writestr(f"digits/{d.target[k]}/{k}.png", png.getvalue())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def test_uploaded_imagefolder_zip_trains(live_service):
    s = live_service
    r = requests.post(s.url("/v1/datasets"), files={"file": ("digits.zip", _digits_zip(), "application/zip")},
                      data={"name": "digits-upload"}, timeout=60)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["classes"] == [str(i) for i in range(10)] and sum(ds["counts"].values()) == 120
    config = {"model": {"name": "small_cnn"},
              "data": {"dataset": ds["id"], "image_size": 16, },
              "training": {"epochs": 2, "batch_size": 16, "device": "cpu"}}
    done = s.wait(s.submit(config)["id"])
    assert done["status"] == "succeeded", done
    r = requests.get(s.url(f"/v1/jobs/{done['id']}/artifacts/checkpoints/best.pt"), timeout=30)
    import torch

    ckpt = torch.load(io.BytesIO(r.content), weights_only=True)
    assert ckpt["classes"] == ds["classes"] and ckpt["config"]["model"]["num_classes"] == 10


@pytest.mark.parametrize("extra, needle", [
    ({"../evil.png": b"x"}, "evil.png"),
    ({"digits/3/notes.png": b"this is not an image"}, "notes.png"),
    ({"digits/4/bomb.png": b"\0" * (8 << 20)}, "bomb.png"),
])
def test_hostile_zip_refused_and_nothing_stored(live_service, extra, needle):
    s = live_service
    before = requests.get(s.url("/v1/datasets"), timeout=30).json()
    r = requests.post(s.url("/v1/datasets"), files={"file": ("d.zip", _digits_zip(20, extra), "application/zip")},
                      timeout=60)
    assert 400 <= r.status_code < 500 and needle in r.text, r.text
    assert requests.get(s.url("/v1/datasets"), timeout=30).json() == before
