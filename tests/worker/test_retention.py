"""worker.retention on a real store and local storage: what deletes refuse, what they remove, the TTL sweep."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from worker import db
from worker.clock import utcnow
from worker.errors import Conflict, NotFound
from worker.registry import Registry
from worker.retention import (delete_dataset, delete_job, delete_model_version, retired_version,
                              sweep_expired)
from worker.storage import Storage
from tests.worker.conftest import TINY


@pytest.fixture
def storage(db_settings) -> Storage:
    return Storage(db_settings.storage)


def _job_with_files(store, storage, status="succeeded", **config):
    job = store.create("train", {**TINY, **config})
    storage.write_recorded(f"jobs/{job['id']}", "config.yaml", b"x: 1\n")
    storage.write_bytes(f"jobs/{job['id']}/checkpoints/last.pt", b"weights")
    if status != "queued":
        with store.engine.begin() as conn:
            conn.execute(db.jobs.update().where(db.jobs.c.id == job["id"]).values(status=status, finished_at=utcnow()))
    return job["id"]


def test_delete_job_refuses_unfinished_then_removes_row_events_and_objects(store, storage):
    job_id = _job_with_files(store, storage, status="queued")
    with pytest.raises(Conflict, match="cancel it first"):
        delete_job(store.engine, storage, job_id)
    assert storage.exists(f"jobs/{job_id}/checkpoints/last.pt")
    store.request_cancel(job_id)
    out = delete_job(store.engine, storage, job_id)
    assert out["objects"] == 2 and out["jobs"] == [job_id]
    assert not storage.exists(f"jobs/{job_id}") and not storage.local_path(f"jobs/{job_id}").exists()
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.job_events)
                            .where(db.job_events.c.job_id == job_id)).scalar_one() == 0
    with pytest.raises(NotFound):
        store.get(job_id)
    with pytest.raises(NotFound):
        delete_job(store.engine, storage, job_id)


def test_delete_dataset_refuses_while_a_queued_job_uses_it(store, storage):
    ds = uuid.uuid4().hex
    with store.engine.begin() as conn:
        conn.execute(db.datasets.insert().values(id=ds, name="d", classes=["a", "b"], counts={"a": 1, "b": 1},
                                                 num_images=2, size=10, created_at=utcnow()))
    storage.write_bytes(f"datasets/{ds}/a/1.png", b"png")
    job = store.create("train", {**TINY, "data": {**TINY["data"], "dataset": ds}})
    with pytest.raises(Conflict) as err:
        delete_dataset(store.engine, storage, ds)
    assert err.value.details == {"jobs": [job["id"]]}
    store.request_cancel(job["id"])
    assert delete_dataset(store.engine, storage, ds)["objects"] == 1
    assert not storage.local_path(f"datasets/{ds}").exists()
    with pytest.raises(NotFound):
        delete_dataset(store.engine, storage, ds)


def _registry(db_settings, storage) -> Registry:
    return Registry(db.make_engine(db_settings), storage, cache_dir=db_settings.cache_path)


def _version(registry, tmp_path, name="m") -> int:
    built = tmp_path / uuid.uuid4().hex
    built.mkdir()
    (built / "model.pt").write_bytes(b"pt")
    (built / "model.safetensors").write_bytes(b"st")
    return registry._insert_version(name, None, "best", built, {"sha256": "0" * 64})["version"]


def test_delete_version_refuses_an_aliased_one_and_never_reuses_its_number(db_settings, storage, tmp_path):
    registry = _registry(db_settings, storage)
    assert [_version(registry, tmp_path) for _ in range(2)] == [1, 2]
    registry.set_alias("m", "production", 2)
    with pytest.raises(Conflict, match="m@production"):
        delete_model_version(registry.engine, storage, "m", 2)
    registry.set_alias("m", "production", 1)
    assert delete_model_version(registry.engine, storage, "m", 2)["objects"] == 3   # model.pt, .safetensors, card
    assert not storage.local_path("models/m/2").exists() and storage.exists("models/m/1/model.pt")
    assert retired_version(storage, "m") == 2
    assert [v["version"] for v in registry.get_model("m")["versions"]] == [1]
    assert _version(registry, tmp_path) == 3                     # 2 is never given again
    with pytest.raises(NotFound):
        delete_model_version(registry.engine, storage, "m", 2)
    with pytest.raises(NotFound):
        delete_model_version(registry.engine, storage, "m", 10**12)


def test_sweep_removes_old_artifacts_keeps_rows_and_recent_jobs(store, storage):
    old, recent = _job_with_files(store, storage), _job_with_files(store, storage)
    queued = _job_with_files(store, storage, status="queued")
    with store.engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.id.in_([old, queued]))
                     .values(finished_at=utcnow() - timedelta(days=10)))
    assert sweep_expired(store.engine, storage, 0) == {"expired": [], "orphans": []}   # 0: forever
    out = sweep_expired(store.engine, storage, 7)
    assert out["expired"] == [old]
    assert not storage.local_path(f"jobs/{old}").exists()
    assert storage.exists(f"jobs/{recent}/checkpoints/last.pt") and storage.exists(f"jobs/{queued}/config.yaml")
    assert store.get(old)["status"] == "succeeded"
    assert "artifacts expired: 2 stored object(s) removed" in store.events(old)[-1]["reason"]
    assert sweep_expired(store.engine, storage, 7)["expired"] == []          # once per job


def test_sweep_removes_the_objects_of_a_deleted_job_row(store, storage):
    kept = _job_with_files(store, storage)
    orphan = uuid.uuid4().hex
    storage.write_bytes(f"jobs/{orphan}/train.log", b"left behind")
    assert sweep_expired(store.engine, storage, 0)["orphans"] == [orphan]
    assert not storage.local_path(f"jobs/{orphan}").exists() and storage.exists(f"jobs/{kept}/config.yaml")
