"""Sweeps: a sweep row and its trials, ordinary child training jobs (``parent`` = the sweep's id).

A sweep never holds a worker slot: it is ``running`` from the moment it is stored (with its trials,
in one transaction), its trials queue and run like any job on every worker, and ``advance_sweeps``
(the reconciler calls it on every pass, on every worker; idempotent, every write a compare-and-set)
records its progress and ends it once every trial has ended: ``succeeded`` naming the best trial, or
``failed`` when no trial succeeded. All of its state is in the store, so it survives any worker.

Successive halving runs inside each trial's own job process (``RungReporter``, called by
worker.jobrun at the end of each epoch): at a rung it records its metric in its progress
(``progress.rungs``) and reads what its siblings recorded there; in the bottom (1 - keep) of at least
two of them, it asks for its own cancel and ends ``cancelled``, marked ``progress.stopped``.
"""
from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import sqlalchemy as sa
import yaml

from configs import dump_yaml, parse_config, to_dict as config_dict
from configs.names import JOB_STATES, TERMINAL_STATES
from configs.paths import check_paths
from configs.sweep import draw_trials, sweep_dict, trial_config, trial_values
from worker import db, workers
from worker.clock import utcnow
from worker.errors import Conflict, InvalidInput
from worker.store import JobStore, record_event

log = logging.getLogger("kiln.sweeps")
J = db.jobs


# ------------------------------------------------------------------ submit and cancel (web's facade)
def submit_sweep(kiln, config: dict, priority: int = 0) -> str:
    """Validate a sweep, store it running with its trials queued (one transaction), send the trials.

    Returns the sweep's id. ConfigError/InvalidInput (422) name the sweep's field."""
    cfg = parse_config(config, "sweep")
    trials = [trial_config(cfg, values) for values in draw_trials(cfg)]
    checked, waits_for = set(), {}
    for trial in trials:
        check_paths("train", config_dict(trial), kiln.settings.data_root_paths)
        if trial.data.dataset not in checked:
            checked.add(trial.data.dataset)
            kiln._check_dataset(trial)
        if trial.training.processes not in waits_for:  # 422 when no live worker could ever hold a trial
            waits_for[trial.training.processes] = _check_fits(kiln, cfg, trial)
    sweep_id, now, plain = uuid.uuid4().hex, utcnow(), sweep_dict(cfg)
    common = dict(attempts=0, cancel_requested=False, priority=int(priority), updated_at=now)
    rows = [dict(id=uuid.uuid4().hex, kind="train", status="queued", config=config_dict(t), parent=sweep_id,
                 max_attempts=kiln.settings.max_attempts, created_at=now + timedelta(microseconds=i + 1), **common)
            for i, t in enumerate(trials)]
    with kiln.store.engine.begin() as conn:
        conn.execute(J.insert().values(id=sweep_id, kind="sweep", status="running", config=plain,
                                       max_attempts=1, created_at=now, started_at=now,
                                       progress={"percent": 0.0}, **{**common, "attempts": 1}))
        record_event(conn, sweep_id, None, "running",
                     f"submitted: {len(rows)} trials ({cfg.method}, seed {cfg.seed}); the sweep holds no worker", now)
        conn.execute(J.insert(), rows)
        conn.execute(db.job_events.insert(), [dict(job_id=r["id"], from_status=None, to_status="queued", at=now,
                                                   reason=f"submitted as trial {i} of sweep {sweep_id}")
                                              for i, r in enumerate(rows, start=1)])
    for row, trial in zip(rows, trials):
        if waits_for[trial.training.processes]:
            workers.set_pending_reason(kiln.engine, row["id"], waits_for[trial.training.processes], in_hand=False)
    kiln.storage.write_recorded(f"jobs/{sweep_id}", "config.yaml", yaml.safe_dump(plain, sort_keys=False).encode())
    for row, trial in zip(rows, trials):
        kiln.storage.write_recorded(f"jobs/{row['id']}", "config.yaml", dump_yaml(trial).encode())
        kiln._send(row)  # a broker outage leaves it queued: the reconciler sends it
    return sweep_id


def _check_fits(kiln, cfg, trial) -> str | None:
    """worker.workers.check_fits for a trial, its 422 naming the sweep's field."""
    try:
        return workers.check_fits(kiln.engine, "train", config_dict(trial), kiln.settings)
    except InvalidInput as exc:
        field = "space.training.processes" if "training.processes" in cfg.space else "base.training.processes"
        details = [{**d, "field": field} for d in exc.details or []]
        raise InvalidInput(exc.message.replace("training.processes", field, 1), details) from None


def cancel_sweep(store: JobStore, sweep_id: str) -> dict:
    """The sweep ends cancelled at once (it runs nothing itself); its queued and running trials are cancelled."""
    row = store.get(sweep_id)
    if row["status"] in TERMINAL_STATES:
        raise Conflict(f"sweep {sweep_id} already {row['status']}; only a running sweep can be cancelled")
    store.transition(sweep_id, "cancelled", "cancelled by request; its unfinished trials are cancelled",
                     expect=("running", "cancelling"), cancel_requested=True)
    _cancel_trials(store, sweep_id)
    return store.get(sweep_id)


def refuse_retry(job: dict) -> None:
    """Conflict for a sweep: it is never queued (no worker runs it); the same config draws the same trials."""
    if job["kind"] == "sweep":
        raise Conflict(f"job {job['id']} is a sweep, which cannot be retried in place; submit its config again "
                       "(the same config draws the same trials) or retry its trials", code="not_retryable")


def _cancel_trials(store: JobStore, sweep_id: str) -> None:
    for trial in children(store, sweep_id):
        if trial["status"] not in TERMINAL_STATES:
            try:
                store.request_cancel(trial["id"])
            except Conflict:
                pass  # it ended meanwhile


# ------------------------------------------------------------------ reading
def children(store: JobStore, sweep_id: str) -> list[dict]:
    """A sweep's trials in the order they were drawn."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(J).where(J.c.parent == sweep_id)
                            .order_by(J.c.created_at, J.c.id)).mappings().all()
    return [dict(r) for r in rows]


def trial_metric(row: dict, metric: str):
    """A trial's value of ``metric``: its best checkpoint's (metrics.best) where recorded, else its last epoch's."""
    for source in (row.get("metrics_best"), row.get("metrics_latest")):
        value = (source or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def summary(store: JobStore, sweep: dict) -> dict:
    """The sweep's view: each trial (id, status, values drawn, metric, stopped) and the best trial so far."""
    cfg = sweep["config"]
    metric, mode, space = cfg.get("metric", "val_accuracy"), cfg.get("mode", "max"), cfg.get("space") or {}
    trials, rows = [], children(store, sweep["id"])
    for index, row in enumerate(rows, start=1):
        p = row.get("progress") or {}
        stopped = p.get("stopped")
        value = trial_metric(row, metric) if row["status"] == "succeeded" or stopped else None
        trials.append({"id": row["id"], "index": index, "status": row["status"],
                       "values": trial_values(space, row["config"]), "metric": value,
                       "epoch": p.get("epoch"), "rungs": p.get("rungs") or {},
                       "stopped": bool(stopped), "stop_reason": (stopped or {}).get("reason")})
    done = [t for t in trials if t["status"] == "succeeded" and t["metric"] is not None]
    best = None
    if done:
        top = (max if mode == "max" else min)(done, key=lambda t: t["metric"])
        config = rows[top["index"] - 1]["config"]
        best = {"id": top["id"], "index": top["index"], "values": top["values"], "metric": top["metric"],
                "config": config}
    counts = {s: sum(t["status"] == s for t in trials) for s in JOB_STATES}
    counts["stopped"] = sum(t["stopped"] for t in trials)
    return {"method": cfg.get("method"), "metric": metric, "mode": mode, "space": space,
            "halving": cfg.get("halving"), "total": len(trials), "counts": counts, "trials": trials, "best": best}


def stop_reason(row: dict) -> str | None:
    """Why successive halving stopped this trial, if it did."""
    return ((row.get("progress") or {}).get("stopped") or {}).get("reason")


def with_sweep(store: JobStore, job: dict) -> dict:
    """A job's JSON with ``sweep`` (its trials and best trial) when it is a sweep."""
    if job.get("kind") == "sweep":
        job["sweep"] = summary(store, job)  # its id and config are all the view reads of the sweep
    return job


# ------------------------------------------------------------------ the controller
def advance_sweeps(store: JobStore) -> dict:
    """One controller pass over unfinished sweeps: progress and best trial recorded; a sweep whose trials
    have all ended is finished. Idempotent: several workers may run it at once."""
    with store.engine.connect() as conn:
        ids = list(conn.execute(sa.select(J.c.id).where(J.c.kind == "sweep",
                                                         J.c.status.in_(("running", "cancelling")))).scalars())
    ended = []
    for sweep_id in ids:
        try:
            if _advance(store, store.get(sweep_id)):
                ended.append(sweep_id)
        except Exception:  # one sweep's trouble must not stop the others
            log.exception("sweep %s: controller pass failed", sweep_id)
    return {"sweeps_ended": ended}


def _advance(store: JobStore, sweep: dict) -> bool:
    if sweep["status"] == "cancelling" or sweep["cancel_requested"]:
        _cancel_trials(store, sweep["id"])
        return store.transition(sweep["id"], "cancelled", "cancelled by request; its unfinished trials are "
                                "cancelled", expect=("running", "cancelling"))
    view = summary(store, sweep)
    trials, best, metric = view["trials"], view["best"], view["metric"]
    finished = [t for t in trials if t["status"] in TERMINAL_STATES]
    percent = round(100.0 * len(finished) / max(1, len(trials)), 1)
    best_metrics = {metric: best["metric"], "trial": best["id"]} if best else None
    with store.engine.begin() as conn:
        conn.execute(J.update().where(J.c.id == sweep["id"], J.c.status == "running").values(
            progress={"percent": percent}, metrics_best=best_metrics, updated_at=utcnow(),
            **({"metrics_latest": best_metrics} if best_metrics else {})))
    if len(finished) < len(trials):
        return False
    c = view["counts"]
    tally = f"{c['succeeded']} succeeded, {c['stopped']} stopped by successive halving, {c['failed']} failed, " \
            f"{c['cancelled'] - c['stopped']} cancelled"
    if best is not None:
        return store.transition(sweep["id"], "succeeded", f"best trial {best['index']} ({best['id']}): "
                                f"{metric} {best['metric']:.4f}; {tally}", expect=("running",))
    return store.transition(sweep["id"], "failed", f"no trial succeeded: {tally}", expect=("running",),
                            error=f"no trial succeeded ({tally})")


# ------------------------------------------------------------------ successive halving, in a trial's job process
class RungReporter:
    """A trial's side of asynchronous successive halving (ASHA, as Ray Tune does it).

    ``on_epoch`` records the trial's metric at a rung and compares it with what the other trials
    recorded there; ``progress`` is what the trial's progress row carries (rungs, and why it stopped)."""

    def __init__(self, store: JobStore, job: dict, owner: str, sweep_config: dict):
        self.store, self.job_id, self.parent, self.owner = store, job["id"], job["parent"], owner
        halving = sweep_config["halving"]
        self.rungs_at, self.keep = [int(r) for r in halving["rungs"]], float(halving.get("keep", 0.5))
        self.metric, self.mode = sweep_config.get("metric", "val_accuracy"), sweep_config.get("mode", "max")
        p = job.get("progress") or {}
        self.rungs: dict = dict(p.get("rungs") or {})  # a resumed attempt keeps what the last one recorded
        self.stopped: dict | None = p.get("stopped")
        self.epochs = int(((job.get("config") or {}).get("training") or {}).get("epochs") or 0)

    @classmethod
    def for_job(cls, store: JobStore, job: dict, owner: str) -> "RungReporter | None":
        """The reporter of a trial of a sweep with halving; None for any other job (or when the store cannot say)."""
        if not job.get("parent"):
            return None
        try:
            sweep = store.get(job["parent"])
        except Exception as exc:  # noqa: BLE001 - halving is best effort; the trial runs to its end
            log.warning("cannot read sweep %s (%s): no successive halving for this trial", job["parent"], exc)
            return None
        config = sweep.get("config") or {}
        return cls(store, job, owner, config) if sweep.get("kind") == "sweep" and config.get("halving") else None

    def progress(self) -> dict:
        return {"rungs": self.rungs, **({"stopped": self.stopped} if self.stopped else {})}

    def on_epoch(self, p: dict) -> bool:
        """Record a rung's metric; True when this trial is stopped (its cancel has been requested)."""
        epoch = p.get("epoch")
        value = (p.get("metrics") or {}).get(self.metric)
        if epoch not in self.rungs_at or not isinstance(value, (int, float)) or self.stopped:
            return False
        self.rungs[str(epoch)] = float(value)
        if epoch >= self.epochs:
            return False  # the trial's last epoch: it completes anyway
        try:
            others = self._others(epoch)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read the sibling trials' rung %s metrics (%s); going on", epoch, exc)
            return False
        cut = cutoff(others, self.keep, self.mode)
        if cut is None or not worse(float(value), cut, self.mode):
            log.info("successive halving: %s %.4f at epoch %d passes (%d other trials at this rung)",
                     self.metric, value, epoch, len(others))
            return False
        side = "below" if self.mode == "max" else "above"
        reason = (f"stopped by successive halving at epoch {epoch} ({self.metric} {value:.4f} is {side} the "
                  f"cutoff {cut:.4f}: the bottom {1 - self.keep:.0%} of {len(others)} other trials at that rung)")
        self.stopped = {"by": "successive_halving", "epoch": epoch, "metric": float(value), "cutoff": cut,
                        "reason": reason}
        log.info("%s", reason)
        self.store.transition(self.job_id, "cancelling", reason, expect=("running",), owner=self.owner,
                              cancel_requested=True)
        return True

    def _others(self, epoch: int) -> list[float]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(J.c.id, J.c.progress).where(J.c.parent == self.parent,
                                                                      J.c.id != self.job_id)).all()
        values = [((p or {}).get("rungs") or {}).get(str(epoch)) for _, p in rows]
        return [float(v) for v in values if isinstance(v, (int, float))]


def cutoff(others: list[float], keep: float, mode: str) -> float | None:
    """The value a trial must reach at a rung: the (1 - keep) quantile of the others' values (linear
    interpolation, numpy's default) for max, the keep quantile for min; None below two values."""
    if len(others) < 2:
        return None
    q = (1.0 - keep) if mode == "max" else keep
    ordered = sorted(others)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def worse(value: float, cut: float, mode: str) -> bool:
    return value < cut if mode == "max" else value > cut
