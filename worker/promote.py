"""Train to production in one job: a succeeded training job whose config has ``register`` is checked
against its gate; passing, its best checkpoint becomes the next version of the model (the gate and
the metrics it saw recorded on the version) and the alias moves to it; failing, the job says why.

Starts in the worker's pool process right after the job's success is recorded (worker.runner), so
the job is already ``succeeded`` whatever happens here: the outcome goes into the job's
``promotion`` (progress.promotion in the row), its events and its log, never into its status. The
registration itself runs in a forked process of its own, as a job does: building a version's
artifacts runs torch, whose thread pools must never start in the pool process (a job process
forked from it afterwards would hang in its first parallel op).
"""
from __future__ import annotations

import dataclasses
import logging

import sqlalchemy as sa

from worker import db, jobproc
from worker.clock import utcnow
from worker.jobproc import Outcome
from worker.store import record_event

log = logging.getLogger("kiln.worker")


def check_gate(require: dict, metrics: dict) -> list[str]:
    """Why ``metrics`` fail the gate ({metric: {min, max}}), one line per bound missed; empty if they pass."""
    failures = []
    for metric, bound in sorted(require.items()):
        value = metrics.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            failures.append(f"{metric} was not recorded")
            continue
        if bound.get("min") is not None and value < bound["min"]:
            failures.append(f"{metric} {value:.4g} < min {bound['min']:g}")
        if bound.get("max") is not None and value > bound["max"]:
            failures.append(f"{metric} {value:.4g} > max {bound['max']:g}")
    return failures


def promote_after_success(ctx, job_id: str) -> None:
    """In the pool process: ``promote_if_gated`` in a forked process when the job has ``register``
    (inline in bookkeeping tests: ``ctx.launch == "inline"``). Start no thread before calling this."""
    try:
        if not (ctx.store.get(job_id).get("config") or {}).get("register"):
            return
    except Exception as exc:  # noqa: BLE001 - the job stays succeeded
        log.warning("cannot read job %s for its promotion: %s", job_id, exc)
        return
    if ctx.launch == "inline":
        promote_if_gated(ctx, job_id)
        return

    def body() -> Outcome:  # in the fork: its own storage client (fsspec's async ones are not fork-safe)
        from worker.storage import Storage

        outcome = promote_if_gated(dataclasses.replace(ctx, storage=Storage(ctx.settings.storage)), job_id)
        return Outcome(status="promoted" if outcome and outcome.get("promoted") else "not promoted")

    ended = jobproc.run_forked(body, watch=lambda: None)
    if ended.status is None:
        log.error("the promotion of job %s did not finish: %s", job_id, ended.died or ended.error)


def promote_if_gated(ctx, job_id: str) -> dict | None:
    """Register a succeeded job's best checkpoint if its ``register`` gate passes; the outcome, recorded
    on the job, or None when the job has no ``register``. Never raises: the job stays succeeded."""
    try:
        job = ctx.store.get(job_id)
        register = (job.get("config") or {}).get("register")
        if not register or job["kind"] != "train" or job["status"] != "succeeded":
            return None
        outcome = _promote(ctx, job_id, register, dict(job.get("metrics_best") or {}))
    except Exception as exc:  # noqa: BLE001 - a registry or storage failure is reported on the job
        log.exception("promotion of job %s failed", job_id)
        outcome = {"promoted": False, "reason": f"registration failed: {type(exc).__name__}: {str(exc)[:300]}"}
    try:
        text = _record(ctx.store.engine, job_id, outcome)
        _append_log(ctx.storage, job_id, text)
    except Exception:  # noqa: BLE001
        log.exception("could not record the promotion outcome of job %s", job_id)
    return outcome


def _promote(ctx, job_id: str, register: dict, metrics: dict) -> dict:
    from worker.registry import Registry

    require = register.get("require") or {}
    failures = check_gate(require, metrics)
    seen = {k: metrics.get(k) for k in ("val_accuracy", "val_loss", "epoch") if k in metrics}
    if failures:
        return {"promoted": False, "reason": "; ".join(failures), "name": register["name"], "metrics": seen}
    registry = Registry.from_settings(ctx.settings, engine=ctx.store.engine, storage=ctx.storage)
    gate = {"require": require, "metrics": seen, "job_id": job_id}
    version = registry.register_model(register["name"], job_id, "best", gate=gate)
    alias = register.get("alias")
    if alias:
        registry.set_alias(register["name"], alias, version["version"])
    passed = ", ".join(f"{k} {seen.get(k)}" for k in sorted(require)) or "no gate"
    return {"promoted": True, "name": register["name"], "version": version["version"], "alias": alias,
            "metrics": seen, "reason": f"passed the gate ({passed})"}


def _append_log(storage, job_id: str, text: str) -> None:
    """The outcome as the last line of the job's train.log (GET /v1/jobs/<id>/logs)."""
    prefix = f"jobs/{job_id}"
    path = f"{prefix}/train.log"
    data = storage.read_bytes(path) if storage.exists(path) else b""
    storage.write_recorded(prefix, "train.log", data + f"[kiln] {text}\n".encode())


def _record(engine: sa.Engine, job_id: str, outcome: dict) -> str:
    """The outcome in the job's progress (the job JSON's ``promotion``) and its events."""
    J = db.jobs
    if outcome["promoted"]:
        text = (f"promoted: {outcome['name']} version {outcome['version']}"
                + (f", alias {outcome['alias']} moved to it" if outcome.get("alias") else "")
                + f"; {outcome['reason']}")
    else:
        text = f"not promoted: {outcome['reason']}"
    log.info("job %s %s", job_id, text)
    with engine.begin() as conn:
        progress = conn.execute(sa.select(J.c.progress).where(J.c.id == job_id)).scalar()
        conn.execute(J.update().where(J.c.id == job_id).values(progress={**(progress or {}), "promotion": outcome}))
        record_event(conn, job_id, "succeeded", "succeeded", text, utcnow())
    return text
