"""The executor behind the thin tasks: lease -> running -> run the kind's runner -> outcome.

A worker takes the job's lease before anything else: a message for a job leased by
a live worker is dropped; a stale lease (dead worker) is taken over and the job
resumes from its last checkpoint. A heartbeat thread keeps the lease alive.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from worker.jobrun import JobRun, job_id_logging, resolve_datasets, work_dir_for
from worker.store import ACTIVE, TERMINAL, JobStore

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
    """What a worker process needs: settings, store, storage, the Celery app (to send)."""
    settings: object
    store: JobStore
    storage: object
    app: object = None
    worker_name: str = field(default_factory=socket.gethostname)

    def send(self, job: dict) -> None:
        from worker.app import send_job

        send_job(self.app, job)
        self.store.mark_enqueued(job["id"])

    def broker_client(self):
        import redis

        return redis.Redis.from_url(self.settings.redis_client_url, socket_timeout=5, socket_connect_timeout=5)


_context: Context | None = None


def context(app) -> Context:
    """This process's Context, built on first use (after fork)."""
    global _context
    if _context is None or _context.app is not app:
        from worker.storage import Storage

        s = app.conf.kiln_settings
        _context = Context(s, JobStore.from_settings(s), Storage(s.storage), app, s.worker_name or socket.gethostname())
    return _context


def reset_context() -> None:
    global _context
    _context = None


class Lease(threading.Thread):
    """Heartbeats the job lease; sets ``lost`` if another owner took it."""

    def __init__(self, store: JobStore, job_id: str, owner: str, every_s: float, ttl_s: float):
        super().__init__(name=f"kiln-lease-{job_id[:8]}", daemon=True)
        self.store, self.job_id, self.owner, self.every_s, self.ttl_s = store, job_id, owner, every_s, ttl_s
        self.lost, self.stopped = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                if not self.store.heartbeat(self.job_id, self.owner, self.ttl_s):
                    log.error("lease on job %s lost; stopping at the next step", self.job_id)
                    self.lost.set()
                    return
            except Exception as exc:  # store blip: keep trying until the lease would expire
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
            lease.start()
            return _run(store.get(job_id), ctx, owner, lease, runners)
        finally:
            lease.stop()
            try:
                store.release_lease(job_id, owner)
            except Exception as exc:
                log.warning("could not release the lease: %s", exc)
            _free_memory()


def _run(job: dict, ctx: Context, owner: str, lease: Lease, runners: dict[str, Runner]) -> str:
    store, job_id = ctx.store, job["id"]
    runner = runners.get(job["kind"])
    if runner is None:
        store.finish(job_id, owner, "failed", "no runner", error=f"no runner for job kind {job['kind']!r} here")
        return "failed"
    run = JobRun(job, ctx, owner, lease)
    try:
        run.work_dir = work_dir_for(ctx, job_id)
        run.dataset_roots = resolve_datasets(ctx, job["config"])
        status = runner(run)
        run.flush(final=True)
    except transient_errors() as exc:
        log.warning("transient error: %s", exc)
        new = store.requeue_lost(job_id, f"transient error: {type(exc).__name__}: {exc}", owner=owner)
        if new == "queued":
            raise Transient(str(exc), retry_in=min(60.0, 5.0 * job["attempts"]))
        return f"ended: {new}"
    except Exception as exc:
        limit = type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded")
        if isinstance(exc, ValueError):
            error = str(exc)
        elif limit:
            error = f"the job exceeded its time limit ({ctx.settings.job_soft_time_limit_s} s)"
        else:
            log.exception("job failed")
            error = f"{type(exc).__name__}: {exc}"
        store.finish(job_id, owner, "failed", f"failed: {error}"[:500], error=error)
        log.error("job failed: %s", error)
        return "failed"
    finally:
        run.sync()
    if lease.lost.is_set():
        log.warning("finished without the lease; the new owner records the outcome")
        return "lease lost"
    if status == "stopped":
        store.finish(job_id, owner, "cancelled", f"cancelled at step {run.step}; checkpoint written")
        return "cancelled"
    store.finish(job_id, owner, "succeeded", f"{status} after {run.step} steps")
    return "succeeded"


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_train(run: JobRun) -> str:
    """kind=train: ml.train.train into the job's directory (resumes from checkpoints/last.pt)."""
    from configs import parse_config
    from ml.train import train

    cfg = parse_config(run.job["config"], "train")
    result = train(cfg, run.work_dir, report=run.report, should_stop=run.should_stop,
                   dataset_roots=run.dataset_roots, console=False)
    return result.status


def run_predict(run: JobRun) -> str:
    """kind=predict: the serving engineer's batch inference (worker.predict_job) over a registered model."""
    from worker.predict_job import run_predict as predict
    from worker.registry import Registry

    registry = Registry.from_settings(run.ctx.settings, engine=run.ctx.store.engine, storage=run.ctx.storage)
    result = predict(run.job["config"], resolve_model=registry.resolve_model, work_dir=run.work_dir,
                     report=run.report, should_stop=run.should_stop, dataset_roots=run.dataset_roots)
    return result["status"]


register_runner("train", run_train)
register_runner("predict", run_predict)
