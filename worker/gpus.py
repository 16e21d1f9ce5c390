"""Which of this host's GPUs a job may use: a host-local allocator built on OS file locks.

A Celery pool child does not own a GPU. Before it leases a job it works out how many GPUs the
job needs (``gpus_needed``) and reserves that many free ids with ``fcntl.flock`` on one file per
GPU id under ``<KILN_HOME>/gpus/``; the job process then sees exactly those GPUs
(``CUDA_VISIBLE_DEVICES``, numbered from 0 inside the job). A lock belongs to the open file, so
the OS drops it when the holder dies (a killed pool child, a crashed host process): no stale
reservation outlives its process. A 4-GPU host thus runs four 1-GPU jobs, two 2-GPU jobs, or one
4-GPU job, in whatever mix fits.

While too few GPUs are free the pool child waits (polling each ``poll_s``), writes why to the job
row (``jobs.pending_reason``, e.g. "waiting for 2 free GPUs on worker gpu-node-1 (1 free)") and
stops waiting when the job is cancelled or another worker takes it. A job that needs more GPUs
than this host has is handed back to the queue (a retry in ``NEVER_FITS_RETRY_S``) with a reason
naming both counts, so a larger worker can take it; so is a waiting job while another live worker
advertises enough free GPUs for it (worker.workers), instead of waiting behind this busy host.

Several Celery workers on one host share the lock folder (the same KILN_HOME), so they share the
GPUs correctly too. The reservation is all-or-nothing: one host-wide lock file serialises the
scans, so two waiting jobs never hold half of what each needs.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

from worker import workers
from worker.workers import gpus_needed

log = logging.getLogger("kiln.worker")
NEVER_FITS_RETRY_S = 10.0
NOTE_EVERY_S = 5.0  # a waiting job's pending reason (and its "in a worker's hands" mark) is refreshed this often


def visible_gpus() -> list[str]:
    """GPU ids this worker may use, without initialising CUDA (pool children fork later):
    CUDA_VISIBLE_DEVICES when set (ids, UUIDs or MIG ids), else one per ``nvidia-smi -L`` line."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def _plural(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


class Reservation:
    """GPU ids held by this process (locks on open files) until ``release()`` or the process ends."""

    def __init__(self, ids: list[str], fds: list[int], host_has_gpus: bool):
        self.ids, self._fds, self.host_has_gpus = list(ids), list(fds), host_has_gpus

    def env(self) -> dict[str, str]:
        """The job process's environment: exactly the reserved GPUs (none for a CPU job on a GPU
        host); nothing on a host without GPUs."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.ids)} if self.host_has_gpus else {}

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *_) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({self.ids})"


class Allocator:
    """This host's GPU ids and their lock files under ``lock_dir``."""

    def __init__(self, ids: list[str], lock_dir: str | Path):
        self.ids = [str(i) for i in ids]
        self.lock_dir = Path(lock_dir)

    @property
    def total(self) -> int:
        return len(self.ids)

    def _path(self, name: str) -> Path:
        return self.lock_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".lock")

    def _open(self, name: str) -> int:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        return os.open(self._path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _scan(self, want: int) -> tuple[list[str], list[int]]:
        """Under the host-wide lock: lock up to ``want`` free GPUs (lowest ids first); with
        ``want`` = 0, count the free ones and keep none."""
        guard = self._open("allocator")
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held for microseconds; released if we die
            ids, fds = [], []
            for gid in self.ids:
                fd = self._open(f"gpu-{gid}")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                ids.append(gid)
                fds.append(fd)
                if want and len(ids) == want:
                    break
            if not want:
                Reservation(ids, fds, True).release()
                fds = []
            return ids, fds
        finally:
            os.close(guard)  # closing the file drops its lock

    def free_ids(self) -> list[str]:
        """GPU ids nobody holds right now."""
        return self._scan(0)[0] if self.ids else []

    def try_reserve(self, n: int) -> Reservation | None:
        """``n`` free GPUs, all or nothing; None when fewer are free (or the host has fewer)."""
        if n <= 0:
            return Reservation([], [], bool(self.ids))
        if n > self.total:
            return None
        ids, fds = self._scan(n)
        if len(ids) < n:
            Reservation(ids, fds, True).release()
            return None
        return Reservation(ids, fds, True)


_hosts: dict[str, Allocator] = {}


def configure(ids: list[str], settings) -> Allocator:
    """The worker's allocator for ``settings`` (celery_main calls it once, before the pool forks)."""
    alloc = _hosts[str(settings.home_path)] = Allocator(ids, settings.home_path / "gpus")
    return alloc


def host_allocator(settings) -> Allocator:
    """This host's allocator for ``settings``; built from ``visible_gpus()`` on first use."""
    key = str(settings.home_path)
    if key not in _hosts:
        configure(visible_gpus(), settings)
    return _hosts[key]


class Requeue(Exception):
    """The job goes back to the queue (runner.Transient: a new message in ``retry_in`` s) for
    another worker to take; the pending reason says why."""
    retry_in = 1.0


class NeverFits(Requeue):
    """The job needs more GPUs than this host has."""
    retry_in = NEVER_FITS_RETRY_S


class HandBack(Requeue):
    """Another live worker advertises enough free GPUs for the job while this host has too few."""
    retry_in = 1.0


def wait_for_gpus(alloc: Allocator, engine, job: dict, worker: str, *, poll_s: float = 1.0,
                  note_every_s: float = NOTE_EVERY_S, sleep: Callable[[float], None] = time.sleep,
                  live_within_s: float = 120.0) -> Reservation | str:
    """Reserve the GPUs ``job`` (a job row) needs on this host, waiting while too few are free.

    Returns the Reservation, or a string saying why no longer to wait ("dropped: cancelled",
    "dropped: leased": another worker took the job). While waiting, the job row's pending reason
    says what it waits for. Raises NeverFits when this host can never hold the job, and HandBack
    when another live worker advertises enough free GPUs (checked each ``note_every_s``): the
    message goes back to the queue, where that worker can take it, instead of waiting here.
    """
    need = gpus_needed(job["kind"], job["config"], alloc.total)
    if need > alloc.total:
        reason = (f"needs {_plural(need)} (training.processes) but worker {worker} has {alloc.total}; "
                  f"waiting for a worker with {_plural(need)}")
        workers.set_pending_reason(engine, job["id"], reason)
        raise NeverFits(reason)
    noted, noted_at = None, 0.0
    while True:
        reservation = alloc.try_reserve(need)
        if reservation is not None:
            if noted is not None or job.get("pending_reason"):
                workers.set_pending_reason(engine, job["id"], None)
            return reservation
        gone = workers.job_taken(engine, job["id"])
        if gone is not None:
            log.info("stopped waiting for GPUs: %s", gone)
            return f"dropped: {gone}"
        free = len(alloc.free_ids())
        reason = f"waiting for {_plural(need).replace(' GPU', ' free GPU')} on worker {worker} ({free} free)"
        now = time.monotonic()
        if reason != noted or now - noted_at >= note_every_s:
            if noted is None:
                log.info("job %s %s", job["id"], reason)
            if noted is None or now - noted_at >= note_every_s:
                other = workers.other_worker_with_free_gpus(engine, worker, need, live_within_s)
                if other is not None:
                    reason = f"{reason}; handed back to the queue: worker {other} has {_plural(need)} free"
                    workers.set_pending_reason(engine, job["id"], reason)
                    raise HandBack(reason)
            workers.set_pending_reason(engine, job["id"], reason)
            noted, noted_at = reason, now
        sleep(poll_s)


def reserve_for_job(ctx, job: dict) -> Reservation | str:
    """worker.runner's call: the job's GPUs on this host (see ``wait_for_gpus``); Requeue for a job
    this host can never hold, or one another worker can run now (the runner sends it back to the
    queue, retried in ``exc.retry_in`` s)."""
    return wait_for_gpus(host_allocator(ctx.settings), ctx.store.engine, job, ctx.worker_name,
                         live_within_s=workers.live_within_s(ctx.settings))
