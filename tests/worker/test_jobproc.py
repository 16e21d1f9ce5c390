"""The job process, for real: forked from a process that multiprocessing takes for a daemon (as a
Celery prefork child is), in its own process group; it may start processes, its death or a lost
lease ends its whole tree, and a cancel it ignores is enforced after the grace period."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time

import pytest

from worker.jobproc import Outcome, run_forked
from worker.procs import alive
from worker.runner import Context, Transient, execute
from worker.storage import Storage


@pytest.fixture
def daemon_parent(monkeypatch):
    """This test process, seen by multiprocessing as a daemon: a Celery pool child's situation."""
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    with pytest.raises(AssertionError, match="daemonic processes are not allowed to have children"):
        multiprocessing.get_context("fork").Process(target=int).start()


@pytest.fixture
def ctx(store, db_settings):
    s = dataclasses.replace(db_settings, heartbeat_s=0.1, lease_timeout_s=5.0, progress_every_s=0.05)
    c = Context(s, store, Storage(s.storage), worker_name="test-host")
    assert c.launch == "forked"  # what workers use
    c.send_message = lambda job: None
    return c


def submit(ctx):
    return ctx.store.create("train", {"data": {"dataset": "digits"}}, max_attempts=2)


def _square(x):
    return x * x


def test_a_job_may_start_processes_although_its_parent_is_a_daemon(ctx, daemon_parent):
    job = submit(ctx)

    def runner(run):
        import torch.utils.data as tud

        loader = tud.DataLoader(list(range(8)), batch_size=4, num_workers=2)  # worker processes
        total = sum(int(b.sum()) for b in loader)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert pool.map(_square, [1, 2, 3]) == [1, 4, 9]
        run.report({"event": "end", "step": total, "epoch": 1, "epochs": 1, "total_steps": total, "percent": 100.0})
        (run.work_dir / "pid").write_text(str(os.getpid()))
        return "completed"

    assert execute(job["id"], ctx, {"train": runner}) == "succeeded"
    row = ctx.store.get(job["id"])
    assert row["status"] == "succeeded" and row["progress"]["step"] == 28  # 0+1+...+7, reported from the job process
    job_pid = int((ctx.storage.local_path(f"jobs/{job['id']}") / "pid").read_text())
    assert job_pid != os.getpid()


def test_errors_in_the_job_process_are_recorded(ctx):
    job = submit(ctx)

    def runner(run):
        raise ValueError("loss is NaN; lower training.lr")

    assert execute(job["id"], ctx, {"train": runner}) == "failed"
    assert ctx.store.get(job["id"])["error"] == "loss is NaN; lower training.lr"


def test_a_killed_job_process_goes_back_to_the_queue(ctx):
    job = submit(ctx)

    def runner(run):
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would

    with pytest.raises(Transient, match="SIGKILL"):
        execute(job["id"], ctx, {"train": runner})
    row = ctx.store.get(job["id"])
    assert row["status"] == "queued" and row["attempts"] == 1 and row["lease_owner"] is None
    events = ctx.store.events(job["id"])
    assert events[-1]["to"] == "queued" and "job process lost" in events[-1]["reason"]


def test_an_ignored_cancel_ends_the_process_group_after_the_grace(ctx, tmp_path):
    """cancel_grace_s is the knob under test: a job stuck in a step is killed, its children too."""
    ctx.settings = dataclasses.replace(ctx.settings, cancel_grace_s=1.0)
    job = submit(ctx)
    pids = tmp_path / "pids"

    def runner(run):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
        child.start()
        pids.write_text(f"{os.getpid()} {child.pid}")
        ctx.store.request_cancel(job["id"])
        time.sleep(600)  # never looks at should_stop

    started = time.monotonic()
    assert execute(job["id"], ctx, {"train": runner}) == "cancelled"
    assert time.monotonic() - started < 60
    row = ctx.store.get(job["id"])
    assert row["status"] == "cancelled"
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), f"process {pid} of the job's group survived"


def test_watch_reason_ends_the_tree_and_is_reported():
    calls = []

    def body():
        time.sleep(600)
        return Outcome(status="completed")

    def watch():
        calls.append(1)
        return "the job's lease was lost to another worker" if len(calls) > 3 else None

    out = run_forked(body, watch=watch, poll_s=0.05, term_grace_s=1.0)
    assert out.killed == "the job's lease was lost to another worker"
    assert out.status is None and "SIGTERM" in out.died
