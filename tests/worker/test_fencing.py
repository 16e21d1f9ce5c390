"""Fencing: a worker that lost its lease writes nothing after another has taken the job. The
lease owner (one attempt on one worker) is the fencing token of every state change, progress
write and artifact commit; a heartbeat that fails for the lease TTL counts as a lost lease."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy.exc

from tests.worker.test_storage_s3 import BUCKET, s3_env  # noqa: F401 - moto's S3 server fixture
from worker.jobsync import DirSync
from worker.runner import Lease
from worker.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


def test_a_lease_whose_heartbeats_fail_for_its_ttl_is_lost():
    class Down:
        def heartbeat(self, *args):
            raise sqlalchemy.exc.OperationalError("UPDATE jobs", {}, Exception("the store is down"))

    lease = Lease(Down(), "job", "owner", every_s=0.02, ttl_s=0.3)
    t0 = time.monotonic()
    lease.start()
    assert lease.lost.wait(5) and 0.3 <= time.monotonic() - t0 < 3
    lease.join(2)


def take_over(store, job_id: str, old: str, new: str) -> None:
    """``old`` ran attempt 1 and stopped heartbeating; ``new`` takes the stale lease (attempt 2)."""
    assert store.acquire_lease(job_id, old, 0.2) and store.start(job_id, old, "host-a")
    time.sleep(0.3)
    assert store.acquire_lease(job_id, new, 30)
    assert store.requeue_lost(job_id, "worker host-a lost (lease expired)", owner=new) == "queued"
    assert store.start(job_id, new, "host-b")


def test_a_stale_holders_state_progress_and_artifacts_are_refused(store, tmp_path):
    job_id = store.create("train", {})["id"]
    take_over(store, job_id, "host-a/1/aaaa", "host-b/2/bbbb")
    assert not store.holds_lease(job_id, "host-a/1/aaaa") and store.holds_lease(job_id, "host-b/2/bbbb")
    assert not store.update_progress(job_id, "host-a/1/aaaa", {"step": 99})
    assert not store.finish(job_id, "host-a/1/aaaa", "succeeded", "done")
    assert not store.heartbeat(job_id, "host-a/1/aaaa", 30)

    storage = Storage(tmp_path / "storage")
    work = tmp_path / "a"
    work.mkdir()
    (work / "last.pt").write_bytes(b"from the stale attempt")
    stale = DirSync(storage, work, f"jobs/{job_id}", fence=lambda: store.holds_lease(job_id, "host-a/1/aaaa"))
    stale.remote = True
    stale.close()  # its last round is refused
    assert stale.fenced_out and not storage.exists(f"jobs/{job_id}/last.pt")
    row = store.get(job_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("running", 2, "host-b/2/bbbb")


WORKER = textwrap.dedent('''
    import dataclasses, logging, sys, time
    from configs.settings import Settings
    from worker.runner import Context, execute
    from worker.storage import Storage
    from worker.store import JobStore

    home, db_url, storage_url, job_id, name, ticks = sys.argv[1:7]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=name + " %(process)d %(message)s")
    s = Settings.for_home(home, auth_enabled=False, database_url=db_url, storage_url=storage_url)
    s = dataclasses.replace(s, heartbeat_s=0.2, lease_timeout_s=2.0, progress_every_s=0.05)

    def tick(run):
        for i in range(1, int(ticks) + 1):
            if run.should_stop():
                return "stopped"
            (run.work_dir / "tick.txt").write_text(f"{name} {i}\\n")
            run.report({"event": "epoch", "epoch": i, "step": i})
            time.sleep(0.1)
        return "completed"

    ctx = Context(s, JobStore.from_settings(s), Storage(s.storage), worker_name=name)
    print(name, "result:", execute(job_id, ctx, {"train": tick}), flush=True)
''')


def start_worker(tmp_path, settings, storage_url, job_id, name, ticks):
    out = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / name), settings.db_url, storage_url,
                             job_id, name, str(ticks)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True), tmp_path / f"{name}.log"


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child pids from /proc (Linux)")
def test_a_frozen_worker_resumed_after_a_takeover_is_refused_and_stops(store, db_settings, s3_env, tmp_path):
    storage_url = f"s3://{BUCKET}/fencing"
    job_id = store.create("train", {})["id"]
    a, a_log = start_worker(tmp_path, db_settings, storage_url, job_id, "host-a", 1000)
    b = None
    try:
        deadline = time.monotonic() + 60
        while ((store.get(job_id)["progress"] or {}).get("step") or 0) < 3:
            assert time.monotonic() < deadline and a.poll() is None, a_log.read_text()
            time.sleep(0.1)
        job_proc = children(a.pid)[0]
        os.killpg(a.pid, signal.SIGSTOP)  # the pool process and its lease thread
        os.killpg(job_proc, signal.SIGSTOP)  # the job process (a group of its own)
        time.sleep(3)  # past the 2 s lease
        b, b_log = start_worker(tmp_path, db_settings, storage_url, job_id, "host-b", 30)
        while store.get(job_id)["attempts"] < 2:
            assert time.monotonic() < deadline and b.poll() is None, b_log.read_text()
            time.sleep(0.1)
        os.killpg(job_proc, signal.SIGCONT)  # the job process first: it tries to write, and is refused
        time.sleep(1.5)
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(30) == 0
        assert b.wait(60) == 0, b_log.read_text()
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    a_out, b_out = a_log.read_text(), b_log.read_text()
    assert "host-a result: lease lost" in a_out, a_out
    assert "progress refused" in a_out and "sync refused" in a_out, a_out
    assert "host-b result: succeeded" in b_out, b_out
    row = store.get(job_id)
    assert (row["status"], row["attempts"], row["worker"]) == ("succeeded", 2, "host-b")
    assert Storage(storage_url).read_bytes(f"jobs/{job_id}/tick.txt") == b"host-b 30\n"
    events = store.events(job_id)
    assert [e["to"] for e in events] == ["queued", "running", "queued", "running", "succeeded"], events
