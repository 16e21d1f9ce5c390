"""Uploaded datasets: a zip checked by worker.zipcheck, then stored atomically, and their rows.

Nothing is stored unless every check passes: only then is the checked folder moved to
datasets/<id>/<class>/<file> and the row inserted.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from configs.names import is_id
from worker.clock import iso, utcnow
from worker.errors import NotFound
from worker.zipcheck import check_and_extract, seekable, upload_slots

# ---------------------------------------------------------------- store + storage

def _row(row) -> dict:
    return {"id": row.id, "name": row.name, "classes": list(row.classes), "counts": dict(row.counts),
            "num_images": row.num_images, "size": row.size, "created_at": iso(row.created_at)}


def _default_name(filename: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", PurePosixPath((filename or "").replace("\\", "/")).stem).strip("-.")
    return stem[:64] or "dataset"


def _store_tree(storage, tree: Path, dataset_id: str) -> None:
    """Move the checked folder to datasets/<id>: one rename on local storage, an upload elsewhere."""
    prefix = f"datasets/{dataset_id}"
    local = storage.local_path(prefix)
    if local is None:
        try:
            storage.put_dir(str(tree), prefix)
        except BaseException:
            storage.delete(prefix)
            raise
        return
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tree, local)  # atomic: readers see all of the dataset or none of it
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staging = local.with_name(f".{dataset_id}.incoming")  # another filesystem: copy, then rename
        try:
            shutil.copytree(tree, staging)
            os.rename(staging, local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _scratch_parent(storage, settings) -> Path:
    # Inside local storage (not under datasets/), so the final move is a same-filesystem rename.
    root = storage.local_path()
    parent = Path(root) / ".incoming" if root is not None else settings.cache_path / "incoming"
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def create_dataset(kiln, fileobj, filename: str, name: str | None = None) -> dict:
    """Check an uploaded ImageFolder zip, store it under datasets/<id>/ and insert its row.

    ``kiln`` is the facade (worker.service.Kiln): its ``engine``, ``storage`` and ``settings`` are used.
    """
    from worker import db

    engine, storage, settings = kiln.engine, kiln.storage, kiln.settings
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=_scratch_parent(storage, settings)))
    try:
        src = seekable(fileobj, scratch)  # reading the body is the request's part
        try:
            tree, counts, size = upload_slots(settings).run(check_and_extract, src, settings, scratch)
        finally:
            if src is not fileobj:
                src.close()
        dataset_id = uuid.uuid4().hex
        row = {"id": dataset_id, "name": name or _default_name(filename), "classes": list(counts),
               "counts": counts, "num_images": sum(counts.values()), "size": size,
               "created_at": utcnow()}
        _store_tree(storage, tree, dataset_id)
        try:
            with engine.begin() as conn:
                conn.execute(db.datasets.insert().values(**row))
        except BaseException:
            _remove(storage, dataset_id)  # the row is the source of truth: no row, no files
            raise
        return {**row, "created_at": iso(row["created_at"])}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove(storage, dataset_id: str) -> None:
    storage.delete(f"datasets/{dataset_id}")


def list_datasets(kiln) -> list[dict]:
    """Every uploaded dataset, newest first."""
    from worker import db

    with kiln.engine.connect() as conn:
        rows = conn.execute(db.datasets.select().order_by(db.datasets.c.created_at.desc(), db.datasets.c.id))
        return [_row(r) for r in rows]


def get_dataset(kiln, dataset_id: str) -> dict:
    """One uploaded dataset by id; NotFound names the id."""
    from worker import db

    row = None
    if is_id(dataset_id):
        with kiln.engine.connect() as conn:
            row = conn.execute(db.datasets.select().where(db.datasets.c.id == dataset_id)).first()
    if row is None:
        raise NotFound(f"no dataset {dataset_id!r}; GET /v1/datasets lists the uploaded ones")
    return _row(row)
