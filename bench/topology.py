"""Numbers of the several-host topology (tests/integration/test_topology.py's cluster: a web host
and two worker hosts on PostgreSQL, Redis over TCP and moto's S3 server).

    python bench/topology.py [--model resnet18] [--calls 30]

1. ``GET /v1/jobs/<id>/artifacts`` latency for a finished job (target <= 50 ms): median and p90 of
   ``--calls`` calls; the listing reads the bucket's listing and the job's sha256 record, no bodies.
2. Time from a worker host's death (SIGKILL of its process group, mid-epoch) to its job running on
   the other host, and to the job's end. It is bounded by KILN_LEASE_TIMEOUT_S (the lease must
   expire) + KILN_RECONCILE_EVERY_S (the other host's reconciler requeues and re-sends it) + the
   job's start on that host (process fork, download of last.pt). The cluster runs with
   lease_timeout_s=4, reconcile_every_s=1, heartbeat_s=0.5 (defaults: 60, 30, 5).

Measured on a 2-core shared machine (all hosts and moto on it): GET /artifacts of a finished
resnet18 job (8 artifacts, 269 MB): median 41.0 ms, p90 58.0 ms over 30 calls; worker host
death -> job running on the other host 3.8 s (the lease had been renewed up to 0.5 s before the
kill), the job succeeded 30.3 s after the kill, attempts 2.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.topology import Cluster  # noqa: E402

SMALL = {"data": {"image_size": 16, "subset": 300}, "training": {"batch_size": 32}}


def job_config(model: str, epochs: int) -> dict:
    return {"model": {"name": model}, "data": SMALL["data"], "training": {**SMALL["training"], "epochs": epochs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    c = Cluster(Path(tempfile.mkdtemp(prefix="kiln-topo.")))
    c.start()
    try:
        done = c.wait(c.submit(job_config(args.model, 1))["id"], timeout=600)
        assert done["status"] == "succeeded", done
        times, listed = [], None
        for _ in range(args.calls):
            t0 = time.perf_counter()
            r = c.get(f"/v1/jobs/{done['id']}/artifacts")
            times.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 200, r.text
            listed = r.json()["artifacts"]
        total = sum(a["size"] for a in listed)
        times.sort()
        print(f"GET /artifacts, finished {args.model} job ({len(listed)} artifacts, {total / 1e6:.0f} MB): "
              f"median {statistics.median(times):.1f} ms, p90 {times[int(0.9 * (len(times) - 1))]:.1f} ms "
              f"over {args.calls} calls (target <= 50 ms)")

        job = c.submit(job_config("small_cnn", 8))
        running = c.wait(job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 1 and j["status"] == "running"
                         and "checkpoints/last.pt" in c.bucket(j["id"]))
        first = running["worker"]
        t0 = time.monotonic()
        c.hosts[first].kill()
        moved = c.wait(job["id"], lambda j: j["status"] == "running" and j["worker"] != first, timeout=300)
        t_running = time.monotonic() - t0
        end = c.wait(job["id"], timeout=600)
        print(f"worker host death -> job running on {moved['worker']}: {t_running:.1f} s "
              f"(lease_timeout_s {c.hosts['web'].settings.lease_timeout_s:g} + reconcile_every_s "
              f"{c.hosts['web'].settings.reconcile_every_s:g} + start); job {end['status']} after "
              f"{time.monotonic() - t0:.1f} s, attempts {end['attempts']}")
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


if __name__ == "__main__":
    main()
