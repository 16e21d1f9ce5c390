"""The `kiln` CLI and /metrics against the live service (real Redis, Celery worker, gunicorn)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def kiln(live, token, *args, timeout=240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_URL", "KILN_TOKEN", "KILN_HOME")}
    env.update(PYTHONPATH=str(ROOT), KILN_URL=live.base_url, KILN_TOKEN=token or "")
    return subprocess.run([sys.executable, "-m", "web.client", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_follow_prints_progress_and_final_metrics(live_service, live_token):
    proc = kiln(live_service, live_token, "submit", "configs/smoke.yaml", "--set", "training.epochs=2", "--follow")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "submitted train job" in out
    assert "epoch 2/2" in out and "loss" in out and "ETA" in out, out  # the progress bar was drawn
    assert "%" in out and "#" in out
    job_id = out.split("submitted train job ", 1)[1].split()[0]
    assert f"job {job_id} succeeded" in out
    assert "best: " in out and "val_accuracy" in out

    status = kiln(live_service, live_token, "status", job_id, "--json")
    assert status.returncode == 0 and '"status": "succeeded"' in status.stdout
    arts = kiln(live_service, live_token, "artifacts", job_id)
    assert "checkpoints/best.pt" in arts.stdout and "train.log" in arts.stdout
    logs = kiln(live_service, live_token, "logs", job_id)
    assert logs.returncode == 0 and logs.stdout.strip()
    jobs = kiln(live_service, live_token, "jobs")
    assert job_id in jobs.stdout


def test_cli_error_paths_live(live_service, live_token):
    if live_token:
        bad = kiln(live_service, "kiln_bad", "jobs")
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
        assert "HTTP 401" in bad.stderr
    missing = kiln(live_service, live_token, "status", "0" * 32)
    assert missing.returncode != 0 and "HTTP 404" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_metrics_count_jobs_and_requests(live_service, live_token):
    headers = {"Authorization": f"Bearer {live_token}"} if live_token else {}
    job = requests.post(f"{live_service.base_url}/v1/jobs", headers=headers, timeout=30,
                        json={"kind": "train", "config": {"model": {"name": "mlp"},
                              "data": {"dataset": "digits", "image_size": 8, "subset": 64},
                              "training": {"epochs": 1, "batch_size": 32}}}).json()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = requests.get(f"{live_service.base_url}/v1/jobs/{job['id']}", headers=headers, timeout=30).json()
        if state["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert state["status"] == "succeeded", state
    time.sleep(5.5)  # the job collector caches for 5 s
    text = requests.get(f"{live_service.base_url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in families["kiln_jobs"].samples}
    assert jobs["succeeded"] >= 1
    assert "kiln_job_duration_seconds" in families
    http = [s for s in families["kiln_http_requests"].samples
            if s.labels.get("route") == "/v1/jobs/<job_id>" and s.labels.get("status") == "200"]
    assert http and sum(s.value for s in http) >= 1  # summed over gunicorn workers


def test_cli_registry_predict_download_and_datasets(live_service, live_token, tmp_path):
    from PIL import Image

    run = kiln(live_service, live_token, "submit", "configs/smoke.yaml", "--follow")
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = run.stdout.split("submitted train job ", 1)[1].split()[0]

    reg = kiln(live_service, live_token, "models", "register", "clidigits", job_id, "--checkpoint", "last")
    assert reg.returncode == 0 and "registered clidigits version 1" in reg.stdout, reg.stderr
    alias = kiln(live_service, live_token, "models", "alias", "clidigits", "production", "1")
    assert alias.returncode == 0 and "clidigits@production -> version 1" in alias.stdout, alias.stderr
    listed = kiln(live_service, live_token, "models", "list")
    assert "clidigits" in listed.stdout and "production->1" in listed.stdout

    images = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        Image.new("L", (8, 8), color=40 * i).save(path)
        images.append(str(path))
    pred = kiln(live_service, live_token, "predict", *images, "--model", "clidigits@production", "--top-k", "3")
    assert pred.returncode == 0, pred.stderr
    lines = pred.stdout.strip().splitlines()
    assert len(lines) == 2 and all("[clidigits:1]" in line for line in lines)

    target = tmp_path / "log.txt"
    down = kiln(live_service, live_token, "download", job_id, "train.log", "-o", str(target))
    assert down.returncode == 0 and target.read_text().strip(), down.stderr

    folder = tmp_path / "shapes"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), color=(80 * i, 0, 200 if label == "b" else 0)).save(folder / label / f"{i}.png")
    up = kiln(live_service, live_token, "datasets", "upload", str(folder), "--name", "shapes")
    assert up.returncode == 0, up.stderr
    assert '"classes"' in up.stdout and '"a"' in up.stdout
    assert "shapes" in kiln(live_service, live_token, "datasets", "list").stdout
