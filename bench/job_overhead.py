"""What the job machinery costs on top of training, on loopback with the embedded parts.

Prints, in one run:
  1. submit-to-first-step latency with a warm worker (target <= 1 s),
  2. sustained POST /v1/jobs rate (jobs are cancelled right after),
  3. a job's training images/s against `python -m ml.train` on the same config (target >= 0.95).
Starts its own Redis, Celery worker and gunicorn (worker.live.LiveService); bounded: ~2 minutes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.live import TINY, LiveService  # noqa: E402

SPEED = {"model": {"name": "small_cnn"}, "data": {"dataset": "digits", "image_size": 32, "num_workers": 0},
         "training": {"epochs": 4, "batch_size": 64, "device": "cpu", "log_every_steps": 10}}


def first_step_latency(s: LiveService, runs: int = 3) -> list[float]:
    cfg = {**TINY, "training": {**TINY["training"], "epochs": 1, "log_every_steps": 1}}
    out = []
    for _ in range(runs):
        t0 = time.time()
        job = s.submit(cfg)
        s.wait(job["id"])
        log = requests.get(s.url(f"/v1/jobs/{job['id']}/logs"), timeout=30).text
        line = next(x for x in log.splitlines() if " step 1/" in x)
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append(stamp - t0)
    return out


def post_rate(s: LiveService, seconds: float = 5.0, threads: int = 4) -> tuple[float, list[str]]:
    ids, lock, stop = [], threading.Lock(), time.monotonic() + seconds

    def loop():
        session = requests.Session()
        while time.monotonic() < stop:
            r = session.post(s.url("/v1/jobs"), json={"kind": "train", "config": TINY}, timeout=30)
            assert r.status_code == 202, r.text
            with lock:
                ids.append(r.json()["id"])

    t0 = time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(ids) / (time.monotonic() - t0), ids


def images_per_s(metrics_path: Path) -> float:
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    rates = [r["images_per_s"] for r in rows if r.get("type") == "epoch"][1:]  # epoch 1 includes warm-up
    return sum(rates) / len(rates)


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="kiln-bench-")) / "var"
    s = LiveService(home)
    try:
        s.start()
        s.wait(s.submit({**TINY, "training": {**TINY["training"], "epochs": 1}})["id"])  # warm the worker
        lat = first_step_latency(s)
        print(f"submit -> first step (warm worker): median {sorted(lat)[len(lat) // 2]:.3f} s "
              f"(runs {', '.join(f'{x:.3f}' for x in lat)}; target <= 1 s)")

        s.stop_worker()  # measure the web + store + broker path alone; the jobs are cancelled after
        rate, ids = post_rate(s)
        print(f"POST /v1/jobs sustained: {rate:.1f} jobs/s over {len(ids)} submissions (4 clients)")
        for job_id in ids:
            requests.post(s.url(f"/v1/jobs/{job_id}/cancel"), timeout=30)
        s.start_worker()

        job = s.submit(SPEED)
        done = s.wait(job["id"], timeout=600)
        assert done["status"] == "succeeded", done
        job_ips = images_per_s(s.settings.home_path / "storage" / "jobs" / job["id"] / "metrics.jsonl")
        cfg_path = home / "speed.yaml"
        cfg_path.write_text(yaml.safe_dump(SPEED))
        out_dir = home / "cli-run"
        subprocess.run([sys.executable, "-m", "ml.train", str(cfg_path), "--out", str(out_dir)], cwd=ROOT,
                       env=s.env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli_ips = images_per_s(out_dir / "metrics.jsonl")
        print(f"training throughput: job {job_ips:.0f} img/s vs python -m ml.train {cli_ips:.0f} img/s "
              f"-> ratio {job_ips / cli_ips:.3f} (target >= 0.95)")
    finally:
        s.stop()
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops every child we started
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
