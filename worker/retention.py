"""Retention: deletes that remove the rows *and* the stored objects, and the artifact TTL sweep.

- A job is deleted once it is finished (succeeded, failed, cancelled): its row, its events, and every
  object under jobs/<id>/; a sweep's finished trials go with it. Model versions registered from it
  stay: the registry copied their weights into models/<name>/<version>/.
- A dataset is deleted unless a queued or running job trains or predicts on it.
- A model version is deleted unless an alias points at it (or a queued or running predict job names
  it as name:version). Its number is never given again: models/<name>/.retired records the highest
  deleted one, because caches and forward processes key a loaded version by (name, version).
- ``sweep_expired`` (from the worker's reconciler, with ``Settings.artifact_ttl_days`` set): jobs
  finished longer ago lose their stored objects; their rows stay, with an event saying so, so the
  job's config, metrics summary and history remain listed.

Each delete is a conditional DELETE of the row first (so a job that starts meanwhile is never deleted),
then the objects; objects whose row is already gone are removed by the next sweep (``orphans``).
"""
from __future__ import annotations

import json
import logging
import shutil
from datetime import timedelta

import sqlalchemy as sa

from configs.names import MAX_VERSION, TERMINAL_STATES, is_id, parse_model_ref
from worker import db
from worker.clock import utcnow
from worker.errors import Conflict, NotFound
from worker.registry import RETIRED, is_name, model_prefix, retired_version
from worker.store import record_event

log = logging.getLogger("kiln.retention")
J, E = db.jobs, db.job_events
UNFINISHED = ("queued", "running", "cancelling")
EXPIRED_REASON = "artifacts expired"  # the job_events reason prefix the sweep writes (and looks for)


def _job_dataset(config) -> str | None:
    """The uploaded dataset a job config names (a training or predict job's data, a sweep's base)."""
    if not isinstance(config, dict):
        return None
    for section in (config, config.get("base")):
        data = section.get("data") if isinstance(section, dict) else None
        if isinstance(data, dict) and isinstance(data.get("dataset"), str):
            return data["dataset"]
    return None


# ------------------------------------------------------------------ jobs
def delete_job(engine, storage, job_id: str) -> dict:
    """Delete a finished job (and a sweep's finished trials): rows, events, objects. 404 / 409 otherwise."""
    if not is_id(job_id):
        raise NotFound(f"job {job_id!r} not found; job ids are 32 hex digits")
    with engine.begin() as conn:
        row = conn.execute(sa.select(J.c.status).where(J.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} not found; list jobs with GET /v1/jobs")
        if row.status not in TERMINAL_STATES:
            raise Conflict(f"job {job_id} is {row.status}; cancel it first (POST /v1/jobs/{job_id}/cancel) "
                           "and delete it once it has ended", code="job_not_finished")
        children = list(conn.execute(sa.select(J.c.id, J.c.status).where(J.c.parent == job_id)))
        busy = [c.id for c in children if c.status not in TERMINAL_STATES]
        if busy:
            raise Conflict(f"sweep {job_id} still has {len(busy)} unfinished trial(s) ({busy[0]}, ...); "
                           "cancel it first", code="job_not_finished")
        ids = [job_id] + [c.id for c in children]
        # conditional: a row that left its terminal state meanwhile (a retry) is not deleted
        conn.execute(E.delete().where(E.c.job_id.in_(ids)))
        gone = conn.execute(J.delete().where(J.c.id.in_(ids), J.c.status.in_(TERMINAL_STATES))).rowcount
        if gone != len(ids):
            raise Conflict(f"job {job_id} changed state while it was being deleted; try again",
                           code="job_not_finished")
    objects = sum(_delete_prefix(storage, f"jobs/{i}") for i in ids)
    log.info("deleted job %s (%d trial(s)) and %d stored object(s)", job_id, len(ids) - 1, objects)
    return {"id": job_id, "deleted": True, "jobs": ids, "objects": objects}


def _delete_prefix(storage, prefix: str) -> int:
    """Remove every object under ``prefix``; returns how many there were (a concurrent sweep may remove
    some of them first: what is gone is not an error)."""
    try:
        count = len(storage.list(prefix, checksums=False)) if storage.exists(prefix) else 0
    except Exception:  # noqa: BLE001 - changing under us (a sweep): removed below all the same
        count = 0
    for _ in range(3):
        try:
            storage.delete(prefix)
            return count
        except FileNotFoundError:
            continue
    storage.delete(prefix)
    return count


# -------------------------------------------------------------- datasets
def delete_dataset(engine, storage, dataset_id: str) -> dict:
    """Delete an uploaded dataset's row and objects; 409 while a queued or running job uses it."""
    if not is_id(dataset_id):
        raise NotFound(f"dataset {dataset_id!r} not found; dataset ids are 32 hex digits")
    d = db.datasets
    with engine.begin() as conn:
        if conn.execute(sa.select(d.c.id).where(d.c.id == dataset_id)).first() is None:
            raise NotFound(f"dataset {dataset_id} not found; list datasets with GET /v1/datasets")
        users = [r.id for r in conn.execute(sa.select(J.c.id, J.c.config).where(J.c.status.in_(UNFINISHED)))
                 if _job_dataset(r.config) == dataset_id]
        if users:
            raise Conflict(f"dataset {dataset_id} is used by {len(users)} queued or running job(s) ({users[0]}, "
                           "...); cancel them or wait until they end", {"jobs": users[:20]}, code="dataset_in_use")
        conn.execute(d.delete().where(d.c.id == dataset_id))
    objects = _delete_prefix(storage, f"datasets/{dataset_id}")
    log.info("deleted dataset %s and %d stored object(s)", dataset_id, objects)
    return {"id": dataset_id, "deleted": True, "objects": objects}


# ---------------------------------------------------------- model versions
def delete_model_version(engine, storage, name: str, version: int, *, cache_dir=None) -> dict:
    """Delete a model version's row and models/<name>/<version>/; 409 while an alias points at it."""
    if not is_name(name) or isinstance(version, bool) or not isinstance(version, int) \
            or not 1 <= version <= MAX_VERSION:
        raise NotFound(f"model {name!r} has no version {version!r}")
    v, a = db.model_versions, db.model_aliases
    with engine.begin() as conn:
        if conn.execute(sa.select(v.c.id).where(v.c.name == name, v.c.version == version)).first() is None:
            raise NotFound(f"model {name!r} has no version {version}")
        aliases = sorted(conn.execute(sa.select(a.c.alias).where(a.c.name == name, a.c.version == version))
                         .scalars())
        if aliases:
            raise Conflict(f"model {name}:{version} is what {', '.join(f'{name}@{x}' for x in aliases)} points at; "
                           "move the alias to another version first", {"aliases": aliases}, code="version_in_use")
        users = [r.id for r in conn.execute(sa.select(J.c.id, J.c.config).where(
            J.c.status.in_(UNFINISHED), J.c.kind == "predict")) if _names_version(r.config, name, version)]
        if users:
            raise Conflict(f"model {name}:{version} is used by {len(users)} queued or running predict job(s) "
                           f"({users[0]}, ...)", {"jobs": users[:20]}, code="version_in_use")
        _retire(storage, name, version)  # before the row goes: a register that sees it gone sees this too
        gone = conn.execute(v.delete().where(
            v.c.name == name, v.c.version == version,
            ~sa.exists().where(a.c.name == name, a.c.version == version))).rowcount
        if gone != 1:
            raise Conflict(f"an alias of {name} moved to version {version} meanwhile; try again",
                           code="version_in_use")
    objects = _delete_prefix(storage, model_prefix(name, version))
    if cache_dir is not None:  # this host's verified copy (remote storage)
        shutil.rmtree(cache_dir / "models" / name / str(version), ignore_errors=True)
    log.info("deleted model %s version %s and %d stored object(s)", name, version, objects)
    return {"name": name, "version": version, "deleted": True, "objects": objects}


def _names_version(config, name: str, version: int) -> bool:
    ref = config.get("model") if isinstance(config, dict) else None
    parsed = parse_model_ref(ref) if isinstance(ref, str) else None
    return parsed is not None and parsed[0] == name and parsed[1] == version


def _retire(storage, name: str, version: int) -> None:
    path = f"models/{name}/{RETIRED}"
    if version > retired_version(storage, name):
        storage.write_bytes(path, json.dumps({"version": version}).encode())


# ---------------------------------------------------------------- the sweep
def sweep_expired(engine, storage, ttl_days: float, *, now=None, limit: int = 100) -> dict:
    """Remove the stored objects of jobs finished more than ``ttl_days`` ago (0: keep forever), and the
    objects of jobs whose row was deleted; each expired job gets an event. Returns what it removed."""
    expired, orphans = [], []
    if ttl_days and ttl_days > 0:
        now = now or utcnow()
        cutoff = now - timedelta(days=ttl_days)
        done = sa.exists().where(E.c.job_id == J.c.id, E.c.reason.like(f"{EXPIRED_REASON}%"))
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(J.c.id, J.c.status).where(
                J.c.status.in_(TERMINAL_STATES), J.c.finished_at.is_not(None), J.c.finished_at < cutoff, ~done)
                .order_by(J.c.finished_at).limit(limit)))
        for row in rows:
            objects = _delete_prefix(storage, f"jobs/{row.id}")
            with engine.begin() as conn:  # several workers sweep: one event per job
                if conn.execute(sa.select(E.c.id).where(E.c.job_id == row.id, E.c.reason.like(
                        f"{EXPIRED_REASON}%")).limit(1)).first() is not None:
                    continue
                record_event(conn, row.id, row.status, row.status,
                             f"{EXPIRED_REASON}: {objects} stored object(s) removed, {ttl_days:g} days after the "
                             "job finished (KILN_ARTIFACT_TTL_DAYS)", utcnow())
            expired.append(row.id)
    orphans = remove_orphans(engine, storage)
    if expired or orphans:
        log.info("retention: artifacts of %d expired job(s) and %d deleted job(s) removed", len(expired), len(orphans))
    return {"expired": expired, "orphans": orphans}


def remove_orphans(engine, storage) -> list[str]:
    """jobs/<id>/ folders whose row is gone (a delete whose object removal failed): removed.

    A job's row is written before any of its objects, so a folder without a row is a deleted job's."""
    try:
        found = [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.fs.ls(storage._full("jobs"), detail=False)]
    except FileNotFoundError:
        return []
    ids = [i for i in found if is_id(i)]
    if not ids:
        return []
    with engine.connect() as conn:
        known = set(conn.execute(sa.select(J.c.id).where(J.c.id.in_(ids))).scalars())
    orphans = [i for i in ids if i not in known]
    for job_id in orphans:
        _delete_prefix(storage, f"jobs/{job_id}")
    return orphans


def sweep(settings, *, engine=None, storage=None) -> dict:
    """One retention pass with ``settings`` (the worker's reconciler calls it)."""
    from worker.storage import Storage

    return sweep_expired(engine if engine is not None else db.make_engine(settings),
                         storage if storage is not None else Storage(settings.storage),
                         settings.artifact_ttl_days)
