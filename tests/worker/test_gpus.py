"""The host's GPU allocator (worker.gpus) on fake GPU ids: reservations are all-or-nothing file
locks, a waiting job says why in its row and stops waiting when it is cancelled or taken, a dead
holder frees its GPUs, and the job process sees exactly the GPUs reserved for it."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from worker import gpus, jobproc
from worker.gpus import Allocator, HandBack, NeverFits, gpus_needed, wait_for_gpus
from worker.workers import advertise
from worker.jobproc import Outcome
from worker.runner import Context, Transient, execute
from worker.storage import Storage

FAKE = ["0", "1", "2", "3"]


def train(processes=1, device="auto"):
    return {"training": {"processes": processes, "device": device, "batch_size": 64}}


@pytest.fixture
def alloc(tmp_path):
    return Allocator(FAKE, tmp_path / "gpus")


def new_job(store, config):
    return store.create("train", config)


def reason_of(store, job_id):
    return store.get(job_id)["pending_reason"]


def test_what_a_job_needs():
    assert gpus_needed("train", train(2), 4) == 2
    assert gpus_needed("train", train("auto"), 4) == 4
    assert gpus_needed("train", train(1), 4) == 1
    assert gpus_needed("train", train(2, "cuda"), 4) == 2
    assert gpus_needed("train", train(1, "cuda:0"), 4) == 1
    assert gpus_needed("train", train(2, "cpu"), 4) == 0  # gloo ranks on the CPU take no GPU
    assert gpus_needed("train", train(8), 4) == 8  # more than the host has: never fits here
    assert gpus_needed("train", train(2), 0) == 0  # a host without GPUs runs it on the CPU
    assert gpus_needed("predict", {"device": "auto"}, 4) == 1
    assert gpus_needed("predict", {"device": "cpu"}, 4) == 0
    assert gpus_needed("sweep", {"base": {}}, 4) == 0


def test_two_2_gpu_jobs_fit_on_4_gpus_and_a_third_waits_until_one_ends(alloc):
    first, second = alloc.try_reserve(2), alloc.try_reserve(2)
    assert first.ids == ["0", "1"] and second.ids == ["2", "3"]
    assert alloc.free_ids() == [] and alloc.try_reserve(1) is None and alloc.try_reserve(2) is None
    first.release()
    assert alloc.free_ids() == ["0", "1"]
    third = alloc.try_reserve(2)
    assert third.ids == ["0", "1"]
    second.release()
    third.release()
    whole = alloc.try_reserve(4)  # one 4-GPU job takes the host
    assert whole.ids == FAKE and alloc.try_reserve(1) is None
    whole.release()
    assert alloc.free_ids() == FAKE


def test_reservation_is_all_or_nothing(alloc):
    held = alloc.try_reserve(3)
    assert alloc.try_reserve(2) is None
    assert alloc.free_ids() == ["3"]  # the failed attempt kept nothing
    held.release()


def test_a_second_allocator_on_the_same_folder_sees_the_same_locks(alloc, tmp_path):
    """Two pool children (or two workers on one host) share the GPUs through the lock files."""
    other = Allocator(FAKE, tmp_path / "gpus")
    held = alloc.try_reserve(3)
    assert other.free_ids() == ["3"] and other.try_reserve(2) is None
    held.release()
    assert other.try_reserve(4) is not None


def test_env_names_exactly_the_reserved_gpus(alloc, tmp_path):
    held = alloc.try_reserve(2)
    assert held.env() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert alloc.try_reserve(0).env() == {"CUDA_VISIBLE_DEVICES": ""}  # a CPU job on a GPU host sees none
    assert Allocator([], tmp_path / "none").try_reserve(0).env() == {}  # a host without GPUs: untouched
    held.release()


HOLDER = """
import sys, time
from worker.gpus import Allocator
held = Allocator(["0", "1", "2", "3"], sys.argv[1]).try_reserve(int(sys.argv[2]))
print("held", held.ids, flush=True)
time.sleep(600)
"""


def test_a_killed_holder_frees_its_gpus(alloc, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "gpus"), "4"], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert proc.stdout.readline().startswith("held")
        assert alloc.free_ids() == [] and alloc.try_reserve(1) is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert alloc.free_ids() == FAKE  # the OS dropped the locks with the process
    assert alloc.try_reserve(4).ids == FAKE


def test_a_waiting_job_writes_why_and_starts_when_gpus_free_up(alloc, store):
    running = [alloc.try_reserve(2), alloc.try_reserve(2)]
    job = new_job(store, train(2))
    got = {}

    def wait():
        got["r"] = wait_for_gpus(alloc, store.engine, store.get(job["id"]), "gpu-node-1", poll_s=0.05)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while reason_of(store, job["id"]) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reason_of(store, job["id"]) == "waiting for 2 free GPUs on worker gpu-node-1 (0 free)"
    assert store.get(job["id"])["enqueued_at"] is not None  # in a worker's hands: the reconciler leaves it
    assert waiter.is_alive()
    running[0].release()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert got["r"].ids == ["0", "1"]
    assert reason_of(store, job["id"]) is None  # cleared once it has its GPUs
    got["r"].release()
    running[1].release()


def test_the_reason_counts_free_gpus(alloc, store):
    held = alloc.try_reserve(3)
    job = new_job(store, train(2))
    sleeps = []

    def sleep(_):  # after the first wait, release one GPU too few, then enough
        sleeps.append(reason_of(store, job["id"]))
        if len(sleeps) == 2:
            held.release()

    r = wait_for_gpus(alloc, store.engine, store.get(job["id"]), "w", poll_s=0, sleep=sleep)
    assert sleeps[0] == "waiting for 2 free GPUs on worker w (1 free)"
    assert r.ids == ["0", "1"]
    r.release()


def test_waiting_stops_when_the_job_is_cancelled(alloc, store):
    held = alloc.try_reserve(4)
    job = new_job(store, train(1))
    calls = []

    def sleep(_):
        calls.append(1)
        store.request_cancel(job["id"])

    assert wait_for_gpus(alloc, store.engine, store.get(job["id"]), "w", poll_s=0, sleep=sleep) == "dropped: cancelled"
    assert len(calls) == 1
    held.release()


def test_waiting_stops_when_another_worker_leases_the_job(alloc, store):
    held = alloc.try_reserve(4)
    job = new_job(store, train(1))
    assert store.acquire_lease(job["id"], "other-host/1/abc", 60)
    assert wait_for_gpus(alloc, store.engine, store.get(job["id"]), "w", poll_s=0,
                         sleep=lambda _: None) == "dropped: leased"
    held.release()


def test_a_job_larger_than_the_host_goes_back_with_a_reason(alloc, store, db_settings):
    job = new_job(store, train(8))
    with pytest.raises(NeverFits):
        wait_for_gpus(alloc, store.engine, store.get(job["id"]), "gpu-node-1")
    assert reason_of(store, job["id"]) == ("needs 8 GPUs (training.processes) but worker gpu-node-1 has 4; "
                                           "waiting for a worker with 8 GPUs")
    gpus.configure(FAKE, db_settings)
    ctx = Context(db_settings, store, Storage(db_settings.storage), worker_name="gpu-node-1", launch="inline")
    with pytest.raises(Transient):  # the task retries later; any worker may take the new message
        execute(job["id"], ctx, {"train": lambda run: "completed"})
    assert store.get(job["id"])["status"] == "queued" and store.get(job["id"])["lease_owner"] is None


def test_a_waiting_job_is_handed_back_when_another_worker_has_free_gpus(alloc, store):
    """Rather than wait behind a busy host, the message goes back to the queue for the idle worker."""
    held = alloc.try_reserve(4)
    job = new_job(store, train(2))
    advertise(store.engine, "gpu-node-1", hostname="h1", gpus=4, free_gpus=0, slots=4)  # this host
    advertise(store.engine, "gpu-node-2", hostname="h2", gpus=2, free_gpus=1, slots=2)  # too few free
    advertise(store.engine, "cpu-node", hostname="h3", gpus=0, free_gpus=0, slots=1)
    sleeps = []

    def sleep(_):
        sleeps.append(1)
        if len(sleeps) == 2:
            advertise(store.engine, "gpu-node-2", hostname="h2", gpus=2, free_gpus=2, slots=2)

    with pytest.raises(HandBack) as info:
        wait_for_gpus(alloc, store.engine, store.get(job["id"]), "gpu-node-1", poll_s=0, note_every_s=0, sleep=sleep)
    assert len(sleeps) == 2  # kept waiting while no other worker had 2 free GPUs
    assert reason_of(store, job["id"]) == str(info.value) == (
        "waiting for 2 free GPUs on worker gpu-node-1 (0 free); handed back to the queue: worker gpu-node-2 "
        "has 2 GPUs free")
    assert info.value.retry_in <= 1.0
    held.release()


def test_the_job_process_gets_the_reserved_gpus():
    out = jobproc.run_forked(lambda: Outcome(status=os.environ.get("CUDA_VISIBLE_DEVICES")),
                             watch=lambda: None, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert out.status == "2,3"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "2,3"  # the pool process is left as it was


def test_execute_hands_the_job_process_its_gpus_and_releases_them(store, db_settings, tmp_path):
    """Two 2-GPU jobs run at once on a fake 4-GPU host, each seeing its own pair; a third waits for
    one of them and then runs on the GPUs it freed; afterwards every GPU is free."""
    s = dataclasses.replace(db_settings, heartbeat_s=0.05, lease_timeout_s=5.0)
    alloc = gpus.configure(FAKE, s)
    seen = tmp_path / "seen"
    seen.mkdir()
    gate = tmp_path / "gate"

    def runner(run):  # in the job process
        (seen / run.job["id"]).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "?"))
        while not gate.exists():
            time.sleep(0.05)
        return "completed"

    jobs = [new_job(store, train(2)) for _ in range(3)]
    results = {}

    def run(job):
        ctx = Context(s, store, Storage(s.storage), worker_name="gpu-node-1")
        results[job["id"]] = execute(job["id"], ctx, {"train": runner})

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs[:2]]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(list(seen.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.read_text() for p in seen.iterdir()) == ["0,1", "2,3"]
    third = threading.Thread(target=run, args=(jobs[2],))
    third.start()
    while reason_of(store, jobs[2]["id"]) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reason_of(store, jobs[2]["id"]) == "waiting for 2 free GPUs on worker gpu-node-1 (0 free)"
    assert store.get(jobs[2]["id"])["status"] == "queued"
    gate.write_text("go")
    for t in (*threads, third):
        t.join(timeout=60)
    assert all(results[j["id"]] == "succeeded" for j in jobs), results
    assert (seen / jobs[2]["id"]).read_text() in ("0,1", "2,3")
    assert alloc.free_ids() == FAKE


def test_a_store_error_after_the_reservation_gives_the_gpus_back(store, db_settings, monkeypatch):
    """The pool process lives on across jobs: a lease the store could not grant (an outage) must not
    keep the GPUs it reserved for the job."""
    from sqlalchemy.exc import OperationalError

    alloc = gpus.configure(FAKE, db_settings)
    job = new_job(store, train(2))

    def store_down(*_args, **_kw):
        raise OperationalError("UPDATE jobs", {}, Exception("the store is down"))

    monkeypatch.setattr(store, "acquire_lease", store_down)
    ctx = Context(db_settings, store, Storage(db_settings.storage), worker_name="gpu-node-1", launch="inline")
    with pytest.raises(OperationalError):
        execute(job["id"], ctx, {"train": lambda run: "completed"})
    assert alloc.free_ids() == FAKE
