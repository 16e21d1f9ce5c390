"""Soak: mixed traffic on `make run` for N minutes, printing the RSS of web, forward, worker and
Redis processes over time, then failed requests and lost jobs.

    python bench/soak.py [--minutes 10] [--every 15]

Traffic: /predict at concurrency 8 (a registered model trained first), a small training job
submitted every few seconds with every other one cancelled, a log follow of the newest job,
and artifact listings and downloads of a finished job. A failed request is a 5xx, a connection
error, or a 4xx other than an intended one (409 for a cancel that lost to the job's end); a lost
job is one not in a terminal state once the queue stopped draining (no job changed state or step
for a minute after the traffic stopped), and a wrong
one ended otherwise than it should (not succeeded, or for a cancelled one neither cancelled nor
succeeded). RSS "levels off" when each part's median over the last quarter of the run is within
10% (or 50 MB) of its median over the second quarter. The exit status is 1 when any request
failed, any job was lost or wrong, or an RSS kept growing.

Measured for 2 minutes on a 2-core shared machine (`--minutes 2`): 40,005 /predict, 222 artifact
listings and 222 best.pt downloads, 25 jobs submitted (12 cancels), 2 log follows; 0 failed
requests, 0 lost jobs; RSS web 192 -> 223 MB (flat from 30 s: 220-223), forward 611 -> 614 MB,
worker 1302-1865 MB (up while a job process runs, back when none does), Redis 4 MB.
Checked for 1 minute later (`--minutes 1 --every 10`): 14,764 /predict, 109 listings and
downloads, 12 jobs (6 cancelled: 6 succeeded, 6 cancelled), 6 log follows; 0 failed requests,
0 lost or wrong jobs; RSS web 1157 MB, forward 614 MB, worker 1813-1946 MB, Redis 4 MB, flat.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.names import TERMINAL_STATES as TERMINAL  # noqa: E402
from worker.live import MakeRun  # noqa: E402

FOLLOW_MAX_S = 600  # Settings.log_follow_max_s: the server ends a follow stream after this long
JOB = {"data": {"image_size": 16, "subset": 300}, "training": {"epochs": 2, "batch_size": 32}}


def digit_png() -> bytes:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    buf = io.BytesIO()
    Image.fromarray(np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def kind_of(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for needle, kind in (("gunicorn", "web"), ("forward", "forward"), ("celery", "worker"),
                         ("redis-server", "redis")):
        if needle in cmd:
            return kind
    return None


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Soak:
    def __init__(self, run: MakeRun):
        self.run, self.stop = run, threading.Event()
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.jobs: list[str] = []
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()

    def call(self, what: str, method: str, path: str, ok=(200, 201, 202), timeout=60, **kw):
        try:
            r = self.run.http.request(method, self.run.url(path), timeout=timeout, **kw)
        except Exception as exc:  # a connection error is a failure
            self.fail(f"{what}: {exc}")
            return None
        self.counts[what] += 1
        if r.status_code not in ok:
            self.fail(f"{what}: {r.status_code} {r.text[:200]}")
        return r

    def fail(self, why: str) -> None:
        with self.lock:
            self.failures.append(why)

    def predict(self, png: bytes) -> None:
        while not self.stop.is_set():
            self.call("predict", "POST", "/predict?model=soak", files={"image": ("d.png", png, "image/png")})

    def submit_and_cancel(self) -> None:
        n = 0
        while not self.stop.wait(4):
            r = self.call("submit", "POST", "/v1/jobs", json={"kind": "train", "config": JOB})
            if r is None or r.status_code != 202:
                continue
            job_id = r.json()["id"]
            with self.lock:
                self.jobs.append(job_id)
            n += 1
            if n % 2 == 0:
                time.sleep(1.5)
                with self.lock:
                    self.cancelled.add(job_id)
                self.call("cancel", "POST", f"/v1/jobs/{job_id}/cancel", ok=(200, 202, 409))

    def follow(self) -> None:
        while not self.stop.wait(1):
            with self.lock:
                job_id = self.jobs[-1] if self.jobs else None
            if job_id:
                # a follow is silent while its job waits in the queue, and ends within log_follow_max_s
                self.call("follow", "GET", f"/v1/jobs/{job_id}/logs?follow=1", timeout=(10, FOLLOW_MAX_S + 60))

    def artifacts(self, job_id: str) -> None:
        while not self.stop.wait(0.5):
            self.call("artifacts", "GET", f"/v1/jobs/{job_id}/artifacts")
            self.call("download", "GET", f"/v1/jobs/{job_id}/artifacts/checkpoints/best.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--every", type=float, default=15, help="seconds between RSS lines")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kiln-soak.")) / "var"
    run = MakeRun(home).start()
    try:
        first = run.wait(run.submit(JOB)["id"])
        assert first["status"] == "succeeded", first
        r = run.http.post(run.url("/v1/models"), json={"name": "soak", "job_id": first["id"]}, timeout=120)
        assert r.status_code == 201, r.text
        soak = Soak(run)
        png = digit_png()
        threads = [threading.Thread(target=soak.predict, args=(png,), daemon=True) for _ in range(8)]
        threads += [threading.Thread(target=soak.submit_and_cancel, daemon=True),
                    threading.Thread(target=soak.follow, daemon=True),
                    threading.Thread(target=soak.artifacts, args=(first["id"],), daemon=True)]
        for t in threads:
            t.start()
        t0, end = time.monotonic(), time.monotonic() + args.minutes * 60
        print(f"{'t (s)':>6} " + " ".join(f"{k + ' MB':>11}" for k in ("web", "forward", "worker", "redis"))
              + "   requests")
        samples: list[dict[str, float]] = []
        while True:
            by_kind: dict[str, float] = collections.defaultdict(float)
            for pid in run.tree() | {run.proc.pid}:
                kind = kind_of(pid)
                if kind:
                    by_kind[kind] += rss_mb(pid)
            samples.append(dict(by_kind))
            print(f"{time.monotonic() - t0:6.0f} " + " ".join(f"{by_kind[k]:11.0f}" for k in
                  ("web", "forward", "worker", "redis")) + f"   {sum(soak.counts.values())}", flush=True)
            if time.monotonic() >= end:
                break
            time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        soak.stop.set()
        for t in threads:
            t.join(90)
        # the queue drains at the worker's pace: a job is lost when it is not terminal and no job
        # has changed state for a minute (or after 10 minutes in all)
        lost, states = list(soak.jobs), {}
        moved, deadline = time.monotonic(), time.monotonic() + 600
        while lost and time.monotonic() - moved < 60 and time.monotonic() < deadline:
            now = {j: (d["status"], d["progress"]["step"]) for j in lost for d in [run.job(j)]}
            if now != states:
                states, moved = now, time.monotonic()
            lost = [j for j in lost if now[j][0] not in TERMINAL]
            time.sleep(1)
        ended = {j: run.job(j)["status"] for j in soak.jobs if j not in lost}
        wrong = {j: st for j, st in ended.items()
                 if st not in (("cancelled", "succeeded") if j in soak.cancelled else ("succeeded",))}
        growing = rss_growth(samples)
        print(f"requests: {dict(soak.counts)}")
        print(f"failed requests: {len(soak.failures)}" + "".join(f"\n  {f}" for f in soak.failures[:20]))
        print(f"jobs submitted: {len(soak.jobs)} ({len(soak.cancelled)} cancelled), ended "
              f"{dict(collections.Counter(ended.values()))}; lost (not terminal when nothing moved for a minute): "
              f"{len(lost)} {[(j, run.job(j)['status']) for j in lost]}; wrong outcome: {len(wrong)} {wrong}")
        print("RSS levels off: " + ("yes" if not growing else f"no: {growing}"))
        ok = not (soak.failures or lost or wrong or growing)
    finally:
        run.stop()
        if not os.environ.get("KILN_SOAK_KEEP"):
            shutil.rmtree(home.parent, ignore_errors=True)
    sys.exit(0 if ok else 1)


def rss_growth(samples: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Parts whose median RSS over the last quarter of the samples is over 10% (and 50 MB) above
    their median over the second quarter: (second quarter, last quarter) in MB. Too few samples
    (under 8) judge nothing."""
    if len(samples) < 8:
        return {}
    q = len(samples) // 4
    out = {}
    for kind in ("web", "forward", "worker", "redis"):
        early = statistics.median(s.get(kind, 0.0) for s in samples[q:2 * q])
        late = statistics.median(s.get(kind, 0.0) for s in samples[-q:])
        if late > early * 1.10 and late - early > 50:
            out[kind] = (round(early), round(late))
    return out


if __name__ == "__main__":
    main()
