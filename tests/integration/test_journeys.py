"""Whole user journeys over HTTP against `make run` (gunicorn, a real Redis, a real Celery worker,
admin token), each job on the default config but for dataset size, image size and epochs."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from worker.live import MakeRun

pytestmark = pytest.mark.integration
KILN_CLI = str(Path(sys.executable).parent / "kiln")


@pytest.fixture(scope="module")
def kiln(tmp_path_factory):
    run = MakeRun(tmp_path_factory.mktemp("journeys") / "var").start()
    try:
        yield run
    finally:
        run.stop()


def digit_pngs(first: int, count: int) -> list[tuple[str, str, bytes]]:
    """Real images: scikit-learn's digits rendered to PNG, as (label, name, bytes)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for k in range(first, first + count):
        buf = io.BytesIO()
        Image.fromarray(np.rint(d.images[k] * 255 / 16).astype(np.uint8), "L").save(buf, "PNG")
        out.append((str(d.target[k]), f"{k}.png", buf.getvalue()))
    return out


def imagefolder_zip(images) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for label, name, data in images:
            z.writestr(f"{label}/{name}", data)
    return buf.getvalue()


def predict(kiln: MakeRun, model: str, images) -> dict:
    files = [("image", (name, data, "image/png")) for _, name, data in images]
    r = kiln.http.post(kiln.url("/predict"), params={"model": model}, files=files, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def artifact(kiln: MakeRun, job_id: str, path: str) -> bytes:
    r = kiln.http.get(kiln.url(f"/v1/jobs/{job_id}/artifacts/{path}"), timeout=60)
    assert r.status_code == 200, r.text
    return r.content


def register_and_promote(kiln: MakeRun, name: str, job_id: str) -> int:
    r = kiln.http.post(kiln.url("/v1/models"), json={"name": name, "job_id": job_id, "checkpoint": "best"},
                       timeout=120)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    r = kiln.http.put(kiln.url(f"/v1/models/{name}/aliases/production"), json={"version": version}, timeout=30)
    assert r.status_code == 200, r.text
    assert kiln.http.get(kiln.url(f"/v1/models/{name}"), timeout=30).json()["aliases"]["production"] == version
    return version


def batch_predict(kiln: MakeRun, model: str, data: dict) -> tuple[dict, list[dict]]:
    """A predict job; returns (the finished job, predictions.jsonl rows)."""
    job = kiln.wait(kiln.submit({"model": model, "data": data}, kind="predict")["id"])
    assert job["status"] == "succeeded", job
    log = kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert "images" in log and "accuracy" in log, log  # a batch-predict job logs what it did
    metrics = kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/metrics"), timeout=30).json()
    assert metrics["epochs"], metrics  # ... and records its accuracy as metrics
    rows = [json.loads(line) for line in artifact(kiln, job["id"], "predictions.jsonl").decode().splitlines()]
    return job, rows


def test_digits_submit_follow_register_serve_and_batch_predict(kiln):
    job = kiln.submit({"data": {"image_size": 16}, "training": {"epochs": 6}})
    seen: list[dict] = []
    done = kiln.wait(job["id"], seen=seen)
    assert done["status"] == "succeeded", done
    percents = [j["progress"]["percent"] for j in seen]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert any(j["status"] == "running" for j in seen)
    assert done["progress"]["eta_s"] in (None, 0, 0.0)

    # the log, followed as a stream, ends when the job has ended
    r = kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/logs"), params={"follow": 1}, timeout=120)
    assert "epoch 6/6" in r.text and "completed" in r.text
    metrics = kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/metrics"), timeout=30).json()
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2, 3, 4, 5, 6]
    names = {a["name"] for a in kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/artifacts"), timeout=30).json()[
        "artifacts"]}
    assert {"config.yaml", "train.log", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"} <= names
    assert any(n.startswith("tensorboard/") for n in names)

    version = register_and_promote(kiln, "digits", job["id"])
    held_out = digit_pngs(1700, 60)  # real digits; the seeded split put some in training, some not
    answer = predict(kiln, "digits@production", held_out)
    assert answer["model"] == {**answer["model"], "name": "digits", "version": version}
    labels = [p["label"] for p in answer["predictions"]]
    accuracy = sum(lab == want for lab, (want, _, _) in zip(labels, held_out)) / len(held_out)
    assert accuracy >= 0.8, (accuracy, labels)

    pjob, rows = batch_predict(kiln, "digits@production", {"dataset": "digits"})
    assert len(rows) == 1797
    assert pjob["metrics"]["latest"]["accuracy"] >= 0.8


def test_your_own_data_upload_train_register_serve_and_batch_predict(kiln):
    images = digit_pngs(0, 800)
    r = kiln.http.post(kiln.url("/v1/datasets"), files={"file": ("digits.zip", imagefolder_zip(images),
                                                                  "application/zip")},
                       data={"name": "my-digits"}, timeout=120)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["classes"] == [str(i) for i in range(10)] and sum(ds["counts"].values()) == 800

    job = kiln.wait(kiln.submit({"data": {"dataset": ds["id"], "image_size": 16}, "training": {"epochs": 15}})["id"])
    assert job["status"] == "succeeded", job
    log = kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert re.search(r"[1-9] loader workers", log), "an on-disk dataset loads with worker processes"

    register_and_promote(kiln, "mine", job["id"])
    sample = images[::40]  # 20 of the uploaded images
    answer = predict(kiln, "mine@production", sample)
    served = [p["label"] for p in answer["predictions"]]

    pjob, rows = batch_predict(kiln, "mine@production", {"dataset": ds["id"]})
    assert len(rows) == 800
    accuracy = sum(row["label"] == row["path"].split("/")[0] for row in rows) / len(rows)
    assert accuracy >= 0.9, accuracy
    assert abs(pjob["metrics"]["latest"]["accuracy"] - accuracy) < 1e-9
    by_path = {row["path"]: row["label"] for row in rows}
    assert served == [by_path[f"{label}/{name}"] for label, name, _ in sample]  # /predict agrees with the job


def test_the_kiln_cli_walks_the_same_journey(kiln, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_URL=kiln.base_url, KILN_TOKEN=kiln.token, PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def cli(*args: str, timeout: float = 600) -> str:
        proc = subprocess.run([KILN_CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    images = digit_pngs(0, 400)
    for label, name, data in images:
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / label / name).write_bytes(data)
    ds = json.loads(cli("datasets", "upload", "data", "--name", "cli-digits"))
    (tmp_path / "train.yaml").write_text(f"data: {{dataset: {ds['id']}, image_size: 16}}\ntraining: {{epochs: 3}}\n")
    out = cli("submit", "train.yaml", "--follow")
    job_id = re.search(r"submitted train job ([0-9a-f]{32})", out).group(1)
    assert "succeeded" in out
    assert "checkpoints/best.pt" in cli("artifacts", job_id)
    cli("download", job_id, "checkpoints/best.pt", "-o", "best.pt")
    import torch

    assert torch.load(tmp_path / "best.pt", weights_only=True)["classes"] == [str(i) for i in range(10)]
    assert "registered cli version 1" in cli("models", "register", "cli", job_id)
    cli("models", "alias", "cli", "production", "1")
    out = cli("predict", "data/3/3.png", "--model", "cli@production")
    assert out.startswith("data/3/3.png: ") and "[cli:1]" in out
    (tmp_path / "predict.yaml").write_text(f"model: cli@production\ndata: {{dataset: {ds['id']}}}\n")
    out = cli("submit", "predict.yaml", "--kind", "predict", "--follow")
    pjob = re.search(r"submitted predict job ([0-9a-f]{32})", out).group(1)
    cli("download", pjob, "predictions.jsonl", "-o", "predictions.jsonl")
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 400


def test_cancel_a_running_job_keeps_its_checkpoint_and_drops_the_eta(kiln):
    job = kiln.submit({"data": {"image_size": 16}, "training": {"epochs": 100}})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        j = kiln.job(job["id"])
        if j["status"] == "running" and (j["progress"]["epoch"] or 0) >= 2:
            break
        time.sleep(0.2)
    assert j["progress"]["eta_s"] is not None and j["progress"]["eta_s"] > 0  # a running job has an ETA
    r = kiln.http.post(kiln.url(f"/v1/jobs/{job['id']}/cancel"), timeout=30)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    done = kiln.wait(job["id"], timeout=120)
    assert done["status"] == "cancelled" and done["progress"]["eta_s"] is None
    ckpt = artifact(kiln, job["id"], "checkpoints/last.pt")
    import torch

    assert torch.load(io.BytesIO(ckpt), weights_only=True)["epoch"] >= 1


def test_a_worker_killed_mid_epoch_is_resumed_on_defaults(kiln):
    """make run restarts its dead worker; the lease (60 s) expires and the job resumes from last.pt."""
    import signal

    job = kiln.submit({"data": {"image_size": 16}, "training": {"epochs": 8}})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        j = kiln.job(job["id"])
        if j["status"] == "running" and (j["progress"]["epoch"] or 0) >= 2:
            break
        time.sleep(0.1)
    pids = json.loads((kiln.home / "kiln.pid").read_text())["children"]
    os.killpg(pids["worker"], signal.SIGKILL)  # the whole worker: Celery, pool child, job process
    done = kiln.wait(job["id"], timeout=400)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    log = kiln.http.get(kiln.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
    assert "resuming from checkpoint at epoch" in log
