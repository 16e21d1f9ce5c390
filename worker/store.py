"""JobStore: the job rows are the source of truth; every state change is a compare-and-set.

Each transition is one conditional UPDATE (``WHERE status = <expected>``) so two
processes can never both win it, and each writes a job_events row with its reason.
A lease (owner, heartbeat, expiry) is taken atomically before a job runs. The owner string is
unique to one attempt on one worker and serves as its fencing token: every write of a lease
holder (transition, progress, heartbeat) carries it in the same compare-and-set, and artifact
commits first check ``holds_lease``; a holder whose lease another took is refused.

A cancel racing the end of a run ends one way: the run's outcome. If the run finished
first, the cancel answers 409 (already succeeded/failed). If the cancel came first
(``cancelling``), the worker's ``finish`` still records what the run did: a run that
completed ends ``succeeded`` with its artifacts (its event says a cancel was pending),
a run that stopped for the cancel ends ``cancelled``. A lease holder whose
compare-and-set loses to a cancel re-reads the row and tries again; only losing the
lease makes it give up, so a finished job is never left to the reconciler's "worker lost".

The queue: a queued job's position is 1 + the queued jobs ahead of it (a higher ``priority``, or
the same priority and created earlier: the order the broker serves them, worker.protocol), and
its pending reason is what a worker wrote in ``pending_reason`` (a GPU shortage, say) or else
how many jobs are ahead. A user's retry moves a failed or cancelled job back to ``queued`` in
place (RETRY below: the only way out of a terminal state).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import sqlalchemy as sa

from configs.names import ACTIVE_STATES as ACTIVE, JOB_STATES, TERMINAL_STATES as TERMINAL
from worker import db
from worker.clock import as_utc, iso, utcnow
from worker.errors import Conflict, NotFound

ALLOWED = {  # from -> the states it may move to; terminal states move nowhere
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled", "cancelling", "queued"},
    "cancelling": {"cancelled", "failed", "succeeded", "queued"},
}
RETRY = {"failed": {"queued"}, "cancelled": {"queued"}}  # JobStore.retry only: a user's retry in place
J = db.jobs


def record_event(conn, job_id: str, from_status: str | None, to_status: str, reason: str, at) -> None:
    """One job_events row, in the caller's transaction (the reason cut to 4000 characters)."""
    conn.execute(db.job_events.insert().values(job_id=job_id, from_status=from_status, to_status=to_status,
                                               reason=reason[:4000], at=at))


class JobStore:
    """Job rows, guarded transitions, leases, progress and cancel requests."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        return cls(db.make_engine(settings))

    # ------------------------------------------------------------------ rows
    def create(self, kind: str, config: dict, *, max_attempts: int = 3, job_id: str | None = None,
               priority: int = 0, parent: str | None = None) -> dict:
        """Insert a queued job; returns its row as a dict."""
        now = utcnow()
        values = dict(id=job_id or uuid.uuid4().hex, kind=kind, status="queued", config=config, attempts=0,
                      max_attempts=max_attempts, cancel_requested=False, created_at=now, updated_at=now,
                      priority=int(priority), parent=parent)
        with self.engine.begin() as conn:
            conn.execute(J.insert().values(**values))
            self._event(conn, values["id"], None, "queued", "submitted", now)
        return self.get(values["id"])

    def get(self, job_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(J).where(J.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFound(f"job {job_id!r} not found; list jobs with GET /v1/jobs")
        return dict(row)

    def list(self, status: str | None = None, kind: str | None = None, limit: int = 50,
             offset: int = 0, parent: str | None = None) -> tuple[list[dict], int]:
        """A page of jobs, newest first, and the total matching the filters (``parent``: a sweep's trials)."""
        where = [c for c in ((J.c.status == status) if status else None,
                             (J.c.kind == kind) if kind else None,
                             (J.c.parent == parent) if parent else None) if c is not None]
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(J).where(*where)).scalar_one()
            rows = conn.execute(sa.select(J).where(*where).order_by(J.c.created_at.desc(), J.c.id)
                                .limit(limit).offset(offset)).mappings().all()
        return [dict(r) for r in rows], int(total)

    def queue_positions(self, rows) -> dict[str, int]:
        """Queue positions (1 = next) of the queued jobs among ``rows``, in one query whatever their number:
        higher priority first, then first-come (created_at, then id for a tie)."""
        ids = [r["id"] for r in rows if r["status"] == "queued"]
        if not ids:
            return {}
        order = (J.c.priority.desc(), J.c.created_at, J.c.id)
        ranked = (sa.select(J.c.id, sa.func.row_number().over(order_by=order).label("position"))
                  .where(J.c.status == "queued").subquery())
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_(ids))).all()
        return {job_id: int(position) for job_id, position in found}

    def job_dicts(self, rows) -> list[dict]:
        """``to_dict`` of each row, queued ones with their queue position (one query for all of them)."""
        positions = self.queue_positions(rows)
        return [to_dict(r, positions.get(r["id"])) for r in rows]

    def job_dict(self, row: dict) -> dict:
        """``to_dict`` of one row with its queue position."""
        return self.job_dicts([row])[0]

    def counts(self) -> dict[str, int]:
        """The number of jobs in each state (every state, zeros included)."""
        with self.engine.connect() as conn:
            found = dict(conn.execute(sa.select(J.c.status, sa.func.count()).group_by(J.c.status)).all())
        return {state: int(found.get(state, 0)) for state in JOB_STATES}

    def worker_heartbeats(self) -> dict[str, datetime]:
        """Each worker's newest heartbeat on any job it ran."""
        query = (sa.select(J.c.worker, sa.func.max(J.c.heartbeat_at))
                 .where(J.c.worker.is_not(None), J.c.heartbeat_at.is_not(None)).group_by(J.c.worker))
        with self.engine.connect() as conn:
            return {worker: as_utc(at) for worker, at in conn.execute(query).all()}

    def events(self, job_id: str) -> list[dict]:
        e = db.job_events
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(e).where(e.c.job_id == job_id).order_by(e.c.id)).mappings().all()
        return [{"from": r["from_status"], "to": r["to_status"], "reason": r["reason"], "at": iso(r["at"])}
                for r in rows]

    def _event(self, conn, job_id, from_status, to_status, reason, now) -> None:
        record_event(conn, job_id, from_status, to_status, reason, now)

    # ----------------------------------------------------------- transitions
    def transition(self, job_id: str, to: str, reason, *, expect: tuple[str, ...] | None = None,
                   owner: str | None = None, where: tuple = (), retry: bool = False, **values) -> bool:
        """Move the job to ``to`` if its status allows it (and is in ``expect``, and ``owner`` holds
        the lease); a compare-and-set on the status, recorded in job_events. False if it lost.

        ``reason`` is the event's text, or a function of the status being left that returns it.
        ``retry`` also allows RETRY's moves out of failed/cancelled (JobStore.retry's path only).
        """
        for _ in range(10):
            row = self.get(job_id)
            current = row["status"]
            allowed = ALLOWED.get(current, set()) | (RETRY.get(current, set()) if retry else set())
            if to not in allowed or (expect is not None and current not in expect):
                return False
            if owner is not None and row["lease_owner"] != owner:
                return False  # lost the lease: someone else decides this job's fate now
            now = utcnow()
            values_now = {"updated_at": now, **values}
            if to in TERMINAL:
                values_now.setdefault("finished_at", now)
                values_now.update(lease_owner=None, lease_expires=None)
            cond = [J.c.id == job_id, J.c.status == current, *where]
            if owner is not None:
                cond.append(J.c.lease_owner == owner)
            with self.engine.begin() as conn:
                # The UPDATE comes first so SQLite takes its write lock at once (no read->write upgrade).
                won = conn.execute(J.update().where(*cond).values(status=to, **values_now)).rowcount == 1
                if won:
                    self._event(conn, job_id, current, to, reason(current) if callable(reason) else reason, now)
                    return True
            # the status moved under us (a cancel request, most often): read it again and decide anew
        return False

    def start(self, job_id: str, owner: str, worker: str) -> bool:
        """queued -> running for the lease holder; counts one attempt."""
        row = self.get(job_id)
        return self.transition(job_id, "running", f"started on {worker} (attempt {row['attempts'] + 1})",
                               expect=("queued",), owner=owner, attempts=J.c.attempts + 1, worker=worker,
                               error=None, started_at=sa.func.coalesce(J.c.started_at, utcnow()))

    def finish(self, job_id: str, owner: str, status: str, reason: str, error: str | None = None) -> bool:
        """Record the run's outcome (succeeded, failed, cancelled) for the lease holder; it wins over a
        cancel requested meanwhile (see the module docstring). False only when the lease was lost."""
        def why(current: str) -> str:
            if current == "cancelling" and status != "cancelled":
                return f"{reason} (a cancel was requested as the run ended; the run's outcome stands)"
            return reason
        return self.transition(job_id, status, why, owner=owner, error=error, cancel_requested=False)

    def requeue_lost(self, job_id: str, reason: str, *, owner: str | None = None) -> str | None:
        """A running job lost its worker: queued again (attempts count the runs), failed after
        max_attempts, or cancelled if a cancel was pending. Returns the new status or None."""
        row = self.get(job_id)
        if row["status"] not in ACTIVE:
            return None
        if row["status"] == "cancelling" or row["cancel_requested"]:
            to, why = "cancelled", f"{reason}; the job was being cancelled"
        elif row["attempts"] >= row["max_attempts"]:
            to, why = "failed", f"{reason}; gave up after {row['attempts']} attempts (max_attempts)"
        else:
            to, why = "queued", f"{reason}; queued again for attempt {row['attempts'] + 1}"
        extra = {"error": why} if to == "failed" else {}
        if owner is not None:  # a worker that retook the stale lease keeps it to run the next attempt
            guard, lease = (J.c.lease_owner == owner,), {}
        else:  # the reconciler: only while the lease is still expired
            guard = (sa.or_(J.c.lease_expires.is_(None), J.c.lease_expires < utcnow()),)
            lease = {"lease_owner": None, "lease_expires": None}
        ok = self.transition(job_id, to, why, expect=(row["status"],), where=guard, enqueued_at=None,
                             **lease, **extra)
        return to if ok else None

    def retry(self, job_id: str, *, extra_attempts: int, reason: str = "retried by user") -> dict:
        """A failed or cancelled job back to ``queued`` in place (same id, config and files): its error
        and cancel flag cleared, ``extra_attempts`` more attempts granted. The run resumes from the
        job's checkpoints/last.pt when there is one (ml.train resumes from it, as after a lost worker).
        Conflict (409) naming the status for any other job."""
        for _ in range(5):
            row = self.get(job_id)
            status = row["status"]
            if status not in RETRY:
                raise Conflict(f"job {job_id} is {status}; only failed or cancelled jobs can be retried",
                               {"status": status}, code="not_retryable")
            attempts = int(row["attempts"] or 0)
            if self.transition(job_id, "queued", f"{reason}; attempt {attempts + 1} of up to "
                               f"{attempts + extra_attempts}", expect=(status,), retry=True,
                               max_attempts=attempts + extra_attempts, error=None, cancel_requested=False,
                               finished_at=None, enqueued_at=None, pending_reason=None, lease_owner=None,
                               lease_expires=None):
                return self.get(job_id)
        raise Conflict(f"job {job_id} changed while being retried; try again", code="not_retryable")

    # ---------------------------------------------------------------- leases
    def acquire_lease(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's lease if it is free, stale, or already ours (atomic)."""
        now = utcnow()
        free = sa.or_(J.c.lease_owner.is_(None), J.c.lease_expires < now, J.c.lease_owner == owner)
        with self.engine.begin() as conn:
            return conn.execute(J.update().where(J.c.id == job_id, J.c.status.in_(("queued",) + ACTIVE), free)
                                .values(lease_owner=owner, lease_expires=now + timedelta(seconds=ttl_s),
                                        heartbeat_at=now)).rowcount == 1

    def heartbeat(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Extend our lease; False when we no longer hold it."""
        now = utcnow()
        with self.engine.begin() as conn:
            return conn.execute(J.update().where(J.c.id == job_id, J.c.lease_owner == owner)
                                .values(heartbeat_at=now, lease_expires=now + timedelta(seconds=ttl_s))
                                ).rowcount == 1

    def holds_lease(self, job_id: str, owner: str) -> bool:
        """True while ``owner`` holds the job's unexpired lease: the fence each artifact commit
        passes (owner is unique to one attempt on one worker, so it is the fencing token)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(J).where(
                J.c.id == job_id, J.c.lease_owner == owner, J.c.lease_expires > utcnow(),
                J.c.status.in_(ACTIVE))).scalar_one() == 1

    def release_lease(self, job_id: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(J.update().where(J.c.id == job_id, J.c.lease_owner == owner)
                         .values(lease_owner=None, lease_expires=None))

    def stale_active(self, now: datetime | None = None) -> list[str]:
        """Running/cancelling jobs whose lease expired (their worker is gone)."""
        now = now or utcnow()
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(J.c.id).where(
                J.c.status.in_(ACTIVE), sa.or_(J.c.lease_expires.is_(None), J.c.lease_expires < now),
                J.c.kind != "sweep")).scalars())  # a sweep runs on no worker (worker.sweeps)

    def queued_unsent(self, older_than_s: float, now: datetime | None = None) -> list[str]:
        """Queued jobs never sent, or sent longer ago than ``older_than_s`` and not leased."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=older_than_s)
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(J.c.id).where(
                J.c.status == "queued", sa.or_(J.c.lease_owner.is_(None), J.c.lease_expires < now),
                sa.or_(J.c.enqueued_at.is_(None), J.c.enqueued_at < cutoff)).order_by(J.c.created_at)).scalars())

    def mark_enqueued(self, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(J.update().where(J.c.id == job_id).values(enqueued_at=utcnow()))

    # -------------------------------------------------------- progress, cancel
    def update_progress(self, job_id: str, owner: str, progress: dict | None = None,
                        latest: dict | None = None, best: dict | None = None) -> bool:
        values = {"updated_at": utcnow()}
        for key, value in (("progress", progress), ("metrics_latest", latest), ("metrics_best", best)):
            if value is not None:
                values[key] = value
        with self.engine.begin() as conn:
            return conn.execute(J.update().where(J.c.id == job_id, J.c.lease_owner == owner,
                                                 J.c.status.in_(ACTIVE)).values(**values)).rowcount == 1

    def request_cancel(self, job_id: str) -> dict:
        """queued -> cancelled at once; running -> cancelling (the loop stops at a step boundary)."""
        for _ in range(5):
            row = self.get(job_id)
            status = row["status"]
            if status in TERMINAL:
                raise Conflict(f"job {job_id} already {status}; only queued or running jobs can be cancelled")
            if status == "cancelling":
                return row
            if status == "queued" and self.transition(job_id, "cancelled", "cancelled by request while queued",
                                                      expect=("queued",), cancel_requested=True):
                return self.get(job_id)
            if status == "running" and self.transition(job_id, "cancelling", "cancel requested",
                                                       expect=("running",), cancel_requested=True):
                return self.get(job_id)
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(sa.select(J.c.cancel_requested).where(J.c.id == job_id)).scalar())


def queue_reason(position: int | None, pending_reason: str | None) -> str | None:
    """Why a queued job is not running: what a worker said, else how many jobs are ahead."""
    if pending_reason:
        return pending_reason
    if position is None:
        return None
    if position <= 1:
        return "next in line; waiting for a free worker"
    ahead = position - 1
    return f"{ahead} job{'s' if ahead != 1 else ''} ahead"


def to_dict(row: dict, position: int | None = None) -> dict:
    """DESIGN.md's job shape; ``position`` is the queued job's place in the queue (JobStore.job_dicts)."""
    p = row.get("progress") or {}
    progress = {k: p.get(k) for k in ("epoch", "epochs", "step", "total_steps", "percent", "eta_s")}
    if progress["percent"] is None:
        progress["percent"] = 100.0 if row["status"] == "succeeded" else 0.0
    if row["status"] != "running":
        progress["eta_s"] = None  # only a job that is running has time left
    queued = row["status"] == "queued"
    queue = {"position": position if queued else None,
             "reason": queue_reason(position, row.get("pending_reason")) if queued else None}
    return {"id": row["id"], "kind": row["kind"], "status": row["status"], "attempts": row["attempts"],
            "max_attempts": row["max_attempts"], "progress": progress,
            "metrics": {"latest": row.get("metrics_latest") or {}, "best": row.get("metrics_best") or {}},
            "config": row["config"], "error": row.get("error"), "worker": row.get("worker"),
            "world_size": int(p.get("world_size") or 1),
            "cancel_requested": bool(row.get("cancel_requested")),
            "promotion": p.get("promotion"), "stopped": p.get("stopped"),  # worker.promote, worker.sweeps
            "queue": queue, "priority": int(row.get("priority") or 0), "parent": row.get("parent"),
            "created_at": iso(row["created_at"]), "started_at": iso(row.get("started_at")),
            "finished_at": iso(row.get("finished_at")), "updated_at": iso(row.get("updated_at"))}
