"""The executor behind the thin tasks, in the worker's pool process: lease -> running -> the job
process -> outcome.

A worker takes the job's lease before anything else: a message for a job leased by a live
worker is dropped; a stale lease (dead worker) is taken over and the job resumes from its
last checkpoint. The pool process heartbeats the lease while the job runs in a job process of
its own (worker.jobproc) and records the outcome that process reports.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from worker import gpus, jobproc
from worker.jobproc import Outcome
from worker.jobrun import JobRun, job_id_logging, remove_scratch, run_job
from worker.promote import promote_after_success
from worker.store import ACTIVE, TERMINAL, JobStore
from worker.sweeps import stop_reason

log = logging.getLogger("kiln.worker")
Runner = Callable[[JobRun], str]
RUNNERS: dict[str, Runner] = {}


class Transient(Exception):
    """An infrastructure error: the job went back to the queue and the task retries later."""

    def __init__(self, message: str, retry_in: float = 5.0):
        super().__init__(message)
        self.retry_in = retry_in


def register_runner(kind: str, fn: Runner) -> None:
    """Register the function that runs jobs of ``kind`` (returns completed|early_stopped|stopped)."""
    RUNNERS[kind] = fn


def transient_errors() -> tuple[type, ...]:
    import redis.exceptions
    import sqlalchemy.exc

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, redis.exceptions.ConnectionError,
            ConnectionError, TimeoutError)


@dataclass
class Context:
    """What a worker process needs: settings, store, storage, a way to send a job message, and how
    jobs are launched (``jobproc.run_forked`` in workers; ``run_inline`` in bookkeeping tests)."""
    settings: object
    store: JobStore
    storage: object
    send_message: Callable[[dict], None] | None = None
    worker_name: str = field(default_factory=socket.gethostname)
    launch: str = "forked"

    def send(self, job: dict) -> None:
        self.send_message(job)
        self.store.mark_enqueued(job["id"])

    def broker_client(self):
        import redis

        return redis.Redis.from_url(self.settings.redis_client_url, socket_timeout=5, socket_connect_timeout=5)


class Lease(threading.Thread):
    """Heartbeats the job lease; sets ``lost`` if another owner took it, or when no heartbeat has
    succeeded for the lease's TTL (a store outage: by then another worker may hold the job)."""

    def __init__(self, store: JobStore, job_id: str, owner: str, every_s: float, ttl_s: float):
        super().__init__(name=f"kiln-lease-{job_id[:8]}", daemon=True)
        self.store, self.job_id, self.owner, self.every_s, self.ttl_s = store, job_id, owner, every_s, ttl_s
        self.lost, self.stopped = threading.Event(), threading.Event()

    def run(self) -> None:
        last_ok = time.monotonic()
        while not self.stopped.wait(self.every_s):
            try:
                if not self.store.heartbeat(self.job_id, self.owner, self.ttl_s):
                    log.error("lease on job %s lost to another worker; ending the job process", self.job_id)
                    self.lost.set()
                    return
                last_ok = time.monotonic()
            except Exception as exc:  # store blip: keep trying until the lease would expire
                if time.monotonic() - last_ok >= self.ttl_s:
                    log.error("no heartbeat for %.0f s (the lease TTL): treating the lease on job %s as "
                              "lost: %s", self.ttl_s, self.job_id, exc)
                    self.lost.set()
                    return
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()


def execute(job_id: str, ctx: Context, runners: dict[str, Runner] | None = None) -> str:
    """Run one job to an outcome; returns what happened (for logs and tests)."""
    runners = RUNNERS if runners is None else runners
    store, s = ctx.store, ctx.settings
    owner = f"{ctx.worker_name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    with job_id_logging(job_id):
        try:
            row = store.get(job_id)
        except Exception as exc:
            if type(exc).__name__ == "NotFound":
                log.warning("dropping message: job %s does not exist", job_id)
                return "dropped: unknown job"
            raise
        if row["status"] in TERMINAL:
            log.info("dropping message: job already %s", row["status"])
            return f"dropped: {row['status']}"
        try:
            reserved = gpus.reserve_for_job(ctx, row)  # the job's GPUs on this host; waits while too few are free
        except gpus.Requeue as exc:  # too few GPUs here, another worker may run it: back to the queue
            raise Transient(str(exc), retry_in=exc.retry_in) from None
        if isinstance(reserved, str):
            return reserved  # the job was cancelled or another worker took it while we waited
        with reserved:  # the GPUs go back when this attempt ends, however it ends
            if not store.acquire_lease(job_id, owner, s.lease_timeout_s):
                log.info("dropping message: job is leased by a live worker")
                return "dropped: leased"
            lease = Lease(store, job_id, owner, s.heartbeat_s, s.lease_timeout_s)
            try:
                row = store.get(job_id)
                if row["status"] in ACTIVE:  # its last worker died; we hold the stale lease now
                    new = store.requeue_lost(job_id, f"worker {row['worker']} lost (lease expired)", owner=owner)
                    if new != "queued":
                        return f"ended: {new}"
                if not store.start(job_id, owner, ctx.worker_name):
                    return "dropped: not startable"
                job = store.get(job_id)
                runner = runners.get(job["kind"])
                if runner is None:
                    store.finish(job_id, owner, "failed", "no runner", error=f"no runner for job kind {job['kind']!r} here")
                    return "failed"
                outcome = _launch(job, ctx, owner, lease, runner, reserved.env())
                return _record(job, ctx, owner, lease, outcome)
            finally:
                lease.stop()
                try:
                    store.release_lease(job_id, owner)
                except Exception as exc:
                    log.warning("could not release the lease: %s", exc)
                remove_scratch(ctx, job_id)


def _launch(job: dict, ctx: Context, owner: str, lease: Lease, runner: Runner, env: dict | None = None) -> Outcome:
    """Run the job in a job process of its own (or inline); the lease is heartbeated from here."""
    transient = transient_errors()
    if ctx.launch == "inline":
        lease.start()
        return jobproc.run_inline(lambda: run_job(job, ctx, owner, runner, transient, lease))
    watch = Watch(ctx.store, job["id"], lease, ctx.settings.cancel_grace_s)

    def body() -> Outcome:  # in the job process: its own storage client (fsspec's async ones are not fork-safe)
        from worker.storage import Storage

        return run_job(job, dataclasses.replace(ctx, storage=Storage(ctx.settings.storage)), owner, runner, transient)

    # fork before the heartbeat thread starts: a fork must not copy a thread holding a lock
    return jobproc.run_forked(body, watch=watch, on_started=lease.start, env=env)


class Watch:
    """Asked by the pool process while the job process runs: a reason to end it, or None."""

    def __init__(self, store: JobStore, job_id: str, lease: Lease, cancel_grace_s: float, check_every_s: float = 1.0):
        self.store, self.job_id, self.lease, self.cancel_grace_s = store, job_id, lease, cancel_grace_s
        self.check_every_s, self._checked, self._cancel_seen = check_every_s, 0.0, None

    def __call__(self) -> str | None:
        if self.lease.lost.is_set():
            return "the job's lease was lost to another worker"
        now = time.monotonic()
        if self._cancel_seen is None and now - self._checked >= self.check_every_s:
            self._checked = now
            try:
                if self.store.cancel_requested(self.job_id):
                    self._cancel_seen = now
            except Exception as exc:  # a store blip: the heartbeat decides liveness
                log.warning("cancel check failed: %s", exc)
        if self._cancel_seen is not None and now - self._cancel_seen > self.cancel_grace_s:
            return f"cancelled, and the job did not stop within {self.cancel_grace_s:g} s"
        return None


def _record(job: dict, ctx: Context, owner: str, lease: Lease, outcome: Outcome) -> str:
    """Write the job process's outcome to the store (the pool process still holds the lease).

    Each write carries the lease owner; a write refused because another attempt took the job
    (however late this one learnt it) records nothing and answers "lease lost"."""
    store, job_id = ctx.store, job["id"]
    if lease.lost.is_set():
        log.warning("the job ended without the lease; the new owner records the outcome")
        return "lease lost"

    def finish(status: str, reason: str, error: str | None = None) -> str:
        if _through_outage(lambda: store.finish(job_id, owner, status, reason, error=error), lease):
            return status
        log.warning("the outcome (%s) was refused: this attempt no longer holds the job's lease", status)
        return "lease lost"

    if outcome.killed and outcome.killed.startswith("cancelled"):
        return finish("cancelled", f"{outcome.killed}: killed; the last checkpoint is kept")
    if outcome.transient or outcome.died:
        why = outcome.transient or outcome.died
        log.warning("job attempt ended: %s", why)
        new = _through_outage(lambda: store.requeue_lost(
            job_id, f"{'transient error' if outcome.transient else 'job process lost'}: {why}", owner=owner), lease)
        if new == "queued":
            raise Transient(why, retry_in=min(60.0, 5.0 * job["attempts"]))
        return f"ended: {new}" if new else "lease lost"
    if outcome.error is not None:
        return finish("failed", f"failed: {outcome.error}"[:500], error=outcome.error)
    if outcome.status == "stopped":  # a cancel, or successive halving in a sweep's trial (worker.sweeps)
        why = stop_reason(store.get(job_id)) or f"cancelled at step {outcome.step}"
        return finish("cancelled", f"{why}; checkpoint written")
    status = finish("succeeded", f"{outcome.status} after {outcome.step} steps")
    if status == "succeeded":  # config.register: its gate decides whether a model version is made
        lease.stop()  # the lease is released; its thread ends before the promotion forks
        if lease.is_alive():
            lease.join()
        promote_after_success(ctx, job_id)
    return status


def _through_outage(write: Callable[[], object], lease: Lease, retry_s: float = 1.0):
    """``write()``, tried again through a store outage for as long as the lease thread counts the
    lease as ours (it gives up after the lease TTL without a heartbeat); None once it is lost. An
    outcome that met an outage is recorded when the store is back, not left to the reconciler
    (which would run the finished job again)."""
    transient = transient_errors()
    while True:
        try:
            return write()
        except transient as exc:
            if lease.lost.is_set() or not lease.is_alive():
                log.warning("could not record the outcome before the lease ran out: %s", exc)
                return None
            log.warning("recording the outcome failed (%s); trying again", exc)
            lease.lost.wait(retry_s)


def run_train(run: JobRun) -> str:
    """kind=train: ml.train.train into the job's directory (resumes from checkpoints/last.pt).

    With training.processes > 1 this job process starts the ranks (ml.launch) in its own process
    group and supervises them: progress and cancel pass through it. A rank that dies or a collective
    that fails is a lost attempt: the job goes back to the queue and resumes from its last checkpoint.
    """
    from configs import parse_config
    from ml.launch import RankFailed
    from ml.train import train

    cfg = parse_config(run.job["config"], "train")
    try:
        result = train(cfg, run.work_dir, report=run.report, should_stop=run.should_stop,
                       dataset_roots=run.dataset_roots, console=False)
    except RankFailed as exc:  # a ConnectionError is transient: back to the queue, attempts + 1
        raise ConnectionError(f"{exc}; the job resumes from its last checkpoint") from exc
    return result.status


def run_predict(run: JobRun) -> str:
    """kind=predict: batch inference of a registered model over a dataset (worker.predict_job)."""
    from worker.predict_job import run_predict as predict
    from worker.registry import Registry

    registry = Registry.from_settings(run.ctx.settings, engine=run.ctx.store.engine, storage=run.ctx.storage)
    result = predict(run.job["config"], resolve_model=registry.resolve_model, work_dir=run.work_dir,
                     report=run.report, should_stop=run.should_stop, dataset_roots=run.dataset_roots)
    return result["status"]


register_runner("train", run_train)
register_runner("predict", run_predict)
