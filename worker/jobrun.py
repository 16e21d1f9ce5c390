"""What runs inside a job process: the job's directory (local storage, or scratch that
worker.jobsync keeps in step with remote storage), its datasets, its local paths (checked against
the data roots), progress at a bounded rate, cached cancel checks, log records tagged with the
job id, and ``run_job``, which runs one runner and returns its Outcome."""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from configs.names import is_id
from configs.paths import check_paths, with_paths
from worker.jobproc import Outcome, classify
from worker.jobsync import DirSync
from worker.sweeps import RungReporter

log = logging.getLogger("kiln.worker")
PROGRESS_KEYS = ("epoch", "epochs", "step", "total_steps", "percent", "eta_s", "world_size")

# ------------------------------------------------------------------ logging: job id on every record
_current_job = "-"
_factory_installed = False


def install_log_factory() -> None:
    """Give every log record a ``job_id`` attribute ("-" outside a job); idempotent."""
    global _factory_installed
    if _factory_installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        record.job_id = _current_job
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


@contextlib.contextmanager
def job_id_logging(job_id: str):
    global _current_job
    install_log_factory()
    previous, _current_job = _current_job, job_id
    try:
        yield
    finally:
        _current_job = previous


# ------------------------------------------------------------------ directories
def scratch_dir(ctx, job_id: str) -> Path:
    """Where a job's files live on this worker while it runs, when storage is remote."""
    return ctx.settings.cache_path / "jobs" / job_id


def work_dir_for(ctx, job_id: str) -> Path:
    """storage's jobs/<id> when local; else a scratch dir primed with what remote storage has (last.pt)."""
    local = ctx.storage.local_path(f"jobs/{job_id}")
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        return local
    cache = scratch_dir(ctx, job_id)
    if cache.exists():
        shutil.rmtree(cache)  # a previous attempt's leftovers may be newer than what was synced
    cache.mkdir(parents=True)
    ctx.storage.get_dir(f"jobs/{job_id}", cache)
    return cache


def remove_scratch(ctx, job_id: str) -> None:
    """Drop the job's scratch copy once the job process has ended (storage holds what it synced)."""
    if ctx.storage.local_path("") is None:
        shutil.rmtree(scratch_dir(ctx, job_id), ignore_errors=True)


def resolve_paths(ctx, job: dict) -> dict:
    """The job with its config's local paths (data.root, model.weights) replaced by their real paths.

    Checked against this worker's data roots before anything opens them; a path outside them is a
    ConfigError, a ValueError (the job fails with a message naming the field, nothing read from disk).
    """
    resolved = check_paths(job["kind"], job["config"], ctx.settings.data_root_paths)
    return {**job, "config": with_paths(job["config"], resolved)} if resolved else job


def resolve_datasets(ctx, config: dict) -> dict[str, str]:
    """Uploaded dataset ids in the config -> local folders (downloaded into the cache when remote)."""
    ds = (config.get("data") or {}).get("dataset")
    if not isinstance(ds, str) or not is_id(ds):
        return {}
    prefix = f"datasets/{ds}"
    local = ctx.storage.local_path(prefix)
    if local is not None:
        if not local.is_dir():
            raise ValueError(f"dataset {ds} is not in storage; upload it again with POST /v1/datasets")
        return {ds: str(local)}
    dest = ctx.settings.cache_path / "datasets" / ds
    if not (dest / ".complete").exists():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if ctx.storage.get_dir(prefix, tmp) == 0:
            raise ValueError(f"dataset {ds} is not in storage; upload it again with POST /v1/datasets")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        (dest / ".complete").touch()
    return {ds: str(dest)}


# ------------------------------------------------------------------ the run
def run_job(job: dict, ctx, owner: str, runner: Callable[["JobRun"], str], transient: tuple[type, ...],
            lease=None) -> Outcome:
    """Run ``runner`` for ``job`` in this process: directory, datasets, progress, final sync."""
    run = JobRun(job, ctx, owner, lease)
    with job_id_logging(job["id"]):
        try:
            run.work_dir = work_dir_for(ctx, job["id"])
            run.dir_sync = DirSync(ctx.storage, run.work_dir, f"jobs/{job['id']}",
                                   fence=lambda: ctx.store.holds_lease(job["id"], owner))
            run.dir_sync.mark_current()
            run.dir_sync.start()  # rounds after each epoch run beside the training loop
            run.job = resolve_paths(ctx, job)
            run.dataset_roots = resolve_datasets(ctx, job["config"])
            outcome = Outcome(status=runner(run))
            run.flush(final=True)
        except Exception as exc:  # every failure becomes an outcome the executor records
            outcome = classify(exc, transient, ctx.settings.job_soft_time_limit_s)
            if outcome.transient:
                log.warning("transient error: %s", outcome.transient)
            else:
                log.error("job failed: %s", outcome.error)
        finally:
            synced = run.sync()
    if outcome.status and not synced and run.dir_sync is not None and not run.dir_sync.fenced_out:
        # what the outcome stands on is not all in storage: run the attempt again from what is
        outcome = Outcome(transient="the job directory could not be synced to storage at the end of the run")
    outcome.step = run.step
    return outcome


class JobRun:
    """Callables handed to a runner: ``report(progress)`` and ``should_stop()``."""

    def __init__(self, job: dict, ctx, owner: str, lease):
        self.job, self.ctx, self.owner, self.lease = job, ctx, owner, lease
        self.work_dir: Path | None = None
        self.dir_sync: DirSync | None = None
        self.dataset_roots: dict[str, str] = {}
        self.step = 0
        self._pending: dict | None = None
        self._last_write = 0.0
        self._last_check = 0.0
        self._cancel = False
        self.fenced = False  # a write was refused: another attempt holds the job now
        self.every_s = ctx.settings.progress_every_s
        self.rungs = RungReporter.for_job(ctx.store, job, owner)  # a sweep's trial: successive halving

    def report(self, p: dict) -> None:
        """Progress from the runner; written to the store at most every progress_every_s (and at each epoch)."""
        self.step = int(p.get("step") or self.step)
        self._pending = p
        event = p.get("event")
        if event == "epoch" and self.rungs is not None and self.rungs.on_epoch(p):
            self._cancel = True  # stopped by successive halving: ends cancelled at the next step
        if event in ("start", "epoch", "end") or time.monotonic() - self._last_write >= self.every_s:
            self.flush()
        if event == "epoch" and self.dir_sync is not None:
            self.dir_sync.request()

    def flush(self, final: bool = False) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        progress = {k: p.get(k) for k in PROGRESS_KEYS}
        if self.rungs is not None:
            progress.update(self.rungs.progress())
        try:
            held = self.ctx.store.update_progress(self.job["id"], self.owner, progress,
                                                  p.get("metrics") or None, p.get("best") or None)
            self._last_write = time.monotonic()
            if not held:
                log.error("progress refused: this attempt no longer holds the job's lease; stopping")
                self.fenced = True
        except Exception as exc:  # progress is best effort; the heartbeat decides liveness
            log.warning("progress update failed: %s", exc)

    def should_stop(self) -> bool:
        """True when a cancel was requested (read at a bounded rate) or the lease was lost."""
        if self.lease is not None and self.lease.lost.is_set():
            return True
        if self.fenced or (self.dir_sync is not None and self.dir_sync.fenced_out):
            return True
        now = time.monotonic()
        if not self._cancel and now - self._last_check >= min(self.every_s, 1.0):
            self._last_check = now
            try:
                self._cancel = self.ctx.store.cancel_requested(self.job["id"])
            except Exception as exc:
                log.warning("cancel check failed: %s", exc)
        return self._cancel

    def sync(self) -> bool:
        """Waits for the round in flight, then the last round: what changed is uploaded (remote
        storage) and its sha256 recorded; tried again through an outage for up to the lease timeout
        (by then the pool process has ended this attempt). True when it went through."""
        if self.dir_sync is None:
            return False
        return self.dir_sync.close(retry_for_s=self.ctx.settings.lease_timeout_s)
