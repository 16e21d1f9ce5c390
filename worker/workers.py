"""What each worker advertises (the ``workers`` table), and what the submit path and the GPU
allocator read and write about it.

A worker's main process upserts its row at start and every ``heartbeat_s`` (``Advertiser``, a
thread beside the reconciler): name, hostname, GPUs, free GPUs (from worker.gpus), pool slots and
a little about its software. A worker is live while its heartbeat is younger than
``live_within_s`` (two lease timeouts); a clean shutdown removes its row.

``check_fits`` runs at submit: a job asking for more GPUs (``training.processes``) than the largest
live GPU worker has is refused (422); with no live worker at all it is accepted and its pending
reason says what it waits for.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta
from typing import Callable

import sqlalchemy as sa

from configs.names import TERMINAL_STATES
from worker import db
from worker.clock import as_utc, iso, utcnow
from worker.errors import InvalidInput

log = logging.getLogger("kiln.worker")
W, J = db.workers, db.jobs


def live_within_s(settings) -> float:
    """A worker whose heartbeat is older than this is not counted as live (two lease timeouts)."""
    return 2 * settings.lease_timeout_s


# ------------------------------------------------------------------ the workers table

def advertise(engine: sa.Engine, name: str, *, hostname: str, gpus: int, free_gpus: int, slots: int,
              info: dict | None = None, started_at: datetime | None = None) -> None:
    """Insert or refresh this worker's row (heartbeat now)."""
    now = utcnow()
    values = {"hostname": hostname, "gpus": gpus, "free_gpus": free_gpus, "slots": slots, "info": info or {},
              "heartbeat_at": now}
    with engine.begin() as conn:
        updated = conn.execute(W.update().where(W.c.name == name).values(
            **values, **({"started_at": started_at} if started_at else {}))).rowcount
        if updated:
            return
    try:
        with engine.begin() as conn:
            conn.execute(W.insert().values(name=name, started_at=started_at or now, **values))
    except sa.exc.IntegrityError:  # another process of the same name inserted first
        with engine.begin() as conn:
            conn.execute(W.update().where(W.c.name == name).values(**values))


def forget(engine: sa.Engine, name: str) -> None:
    """Remove a worker's row (its clean shutdown)."""
    with engine.begin() as conn:
        conn.execute(W.delete().where(W.c.name == name))


def list_workers(engine: sa.Engine, live_within: float, now: datetime | None = None) -> list[dict]:
    """Every advertised worker, by name, with ``live`` (heartbeat within ``live_within`` seconds)."""
    now = now or utcnow()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(W).order_by(W.c.name)).mappings().all()
    out = []
    for r in rows:
        beat = as_utc(r["heartbeat_at"])
        out.append({"name": r["name"], "hostname": r["hostname"], "gpus": r["gpus"], "free_gpus": r["free_gpus"],
                    "slots": r["slots"], "info": r["info"] or {}, "started_at": iso(r["started_at"]),
                    "heartbeat_at": iso(beat), "live": beat is not None and now - beat <= timedelta(seconds=live_within)})
    return out


def other_worker_with_free_gpus(engine: sa.Engine, me: str, need: int, live_within: float) -> str | None:
    """The name of a live worker other than ``me`` that advertises at least ``need`` free GPUs."""
    cutoff = utcnow() - timedelta(seconds=live_within)
    with engine.connect() as conn:
        return conn.execute(sa.select(W.c.name).where(W.c.name != me, W.c.free_gpus >= need, W.c.gpus > 0,
                                                      W.c.heartbeat_at >= cutoff)
                            .order_by(W.c.free_gpus.desc(), W.c.name).limit(1)).scalar()


# ------------------------------------------------------------------ submit

def gpus_needed(kind: str, config: dict, host_gpus: int) -> int:
    """GPUs a job takes on a host with ``host_gpus`` of them: 0 on a host without GPUs and for
    jobs on device cpu/mps; ``training.processes`` for a train job on device auto/cuda (``auto``:
    all of the host's); 1 for a single-device train (cuda:N) or predict job."""
    if host_gpus <= 0 or not isinstance(config, dict):
        return 0
    if kind == "train":
        training = config.get("training") or {}
        device, processes = str(training.get("device", "auto")), training.get("processes", 1)
        if device in ("cpu", "mps"):
            return 0
        if device.startswith("cuda:"):
            return 1
        if processes == "auto":
            return host_gpus
        try:
            return max(1, int(processes))
        except (TypeError, ValueError):
            return 1
    if kind == "predict":
        return 0 if str(config.get("device", "auto")) in ("cpu", "mps") else 1
    return 0  # a sweep's parent only creates and watches its trials


def requested_gpus(kind: str, config: dict) -> int | None:
    """GPUs a job asks for by number on a GPU worker: ``training.processes`` (> 1) of a train job
    that runs on GPUs; None when any GPU worker can hold it (auto, one process, a CPU job)."""
    processes = (config.get("training") or {}).get("processes", 1) if kind == "train" else 1
    if isinstance(processes, bool) or not isinstance(processes, int) or processes <= 1:
        return None
    need = gpus_needed(kind, config, host_gpus=processes)
    return need if need > 1 else None


def check_fits(engine: sa.Engine, kind: str, config: dict, settings) -> str | None:
    """At submit: InvalidInput (422 naming training.processes) if live workers advertise GPUs and
    the job asks for more than the largest of them has. With no live worker at all, the reason the
    job will wait for (for its pending reason); None when nothing stands in its way."""
    need = requested_gpus(kind, config)
    workers = [w for w in list_workers(engine, live_within_s(settings)) if w["live"]]
    if need is None:
        return None
    if not workers:
        return f"no live worker has {need} GPUs (no worker is live); the job starts when one with {need} joins"
    largest = max(workers, key=lambda w: (w["gpus"], w["name"]))
    if largest["gpus"] and need > largest["gpus"]:
        problem = (f"asks for {need} GPUs but the largest live worker ({largest['name']}) has {largest['gpus']}; "
                   f"use processes: auto or <= {largest['gpus']}")
        raise InvalidInput(f"training.processes {problem}",
                           [{"field": "training.processes", "message": problem}])
    return None


# ------------------------------------------------------------------ job rows

def set_pending_reason(engine: sa.Engine, job_id: str, reason: str | None, *, in_hand: bool = True) -> None:
    """Why a job that is not running yet waits (None clears it). A worker's reason (``in_hand``) also
    marks the job as in that worker's hands now (enqueued_at), so the reconciler does not send it
    again meanwhile."""
    values: dict = {"pending_reason": reason}
    if reason is not None and in_hand:
        values["enqueued_at"] = utcnow()
    with engine.begin() as conn:
        conn.execute(J.update().where(J.c.id == job_id, J.c.status.not_in(TERMINAL_STATES)).values(**values))


def job_taken(engine: sa.Engine, job_id: str) -> str | None:
    """Why a worker waiting to run the job should stop: its status when it ended (cancelled...),
    "leased" when a live lease is held (another worker runs it), "gone"; None to keep waiting."""
    now = utcnow()
    with engine.connect() as conn:
        row = conn.execute(sa.select(J.c.status, J.c.lease_owner, J.c.lease_expires)
                           .where(J.c.id == job_id)).first()
    if row is None:
        return "gone"
    if row.status in TERMINAL_STATES:
        return row.status
    if row.lease_owner is not None and row.lease_expires is not None and as_utc(row.lease_expires) > now:
        return "leased"
    return None


# ------------------------------------------------------------------ the advertising thread

class Advertiser(threading.Thread):
    """A daemon thread in the worker's main process: upserts its row every ``every_s``."""

    def __init__(self, engine: sa.Engine, name: str, gpus: list[str], slots: int,
                 free: Callable[[], int], every_s: float, info: dict | None = None):
        super().__init__(name="kiln-advertiser", daemon=True)
        self.engine, self.worker, self.gpus, self.slots, self.free = engine, name, list(gpus), slots, free
        self.every_s, self.started_at = every_s, utcnow()
        self.info = {"gpu_ids": self.gpus, "pid": os.getpid(), **(info or {})}
        self.stopped = threading.Event()

    def beat(self) -> None:
        advertise(self.engine, self.worker, hostname=socket.gethostname(), gpus=len(self.gpus),
                  free_gpus=self.free(), slots=self.slots, info=self.info, started_at=self.started_at)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
            except Exception as exc:  # a store blip must not end the thread
                log.warning("could not advertise this worker: %s", exc)
            self.stopped.wait(self.every_s)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=10)  # a beat in flight would write the row again after forget()
        try:
            forget(self.engine, self.worker)
        except Exception as exc:
            log.warning("could not remove this worker's row: %s", exc)
