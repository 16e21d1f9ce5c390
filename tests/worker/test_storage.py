"""Storage: atomic writes, sha256 listing, traversal refused; local dir and an fsspec URL."""
from __future__ import annotations

import hashlib

import pytest

from worker.errors import InvalidInput
from worker.storage import Storage, clean_path


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "storage")
    import uuid

    return Storage(f"memory://kiln-test-{uuid.uuid4().hex}")


def test_write_list_read(storage):
    storage.write_bytes("jobs/a/train.log", b"hello\n")
    storage.write_bytes("jobs/a/checkpoints/last.pt", b"x" * 10)
    items = storage.list("jobs/a")
    assert [i["name"] for i in items] == ["checkpoints/last.pt", "train.log"]
    assert items[1] == {"name": "train.log", "size": 6, "sha256": hashlib.sha256(b"hello\n").hexdigest()}
    assert storage.read_bytes("jobs/a/train.log") == b"hello\n" and storage.size("jobs/a/train.log") == 6
    assert storage.exists("jobs/a/train.log") and not storage.exists("jobs/b")
    assert storage.list("jobs/missing") == []
    storage.delete("jobs/a")
    assert not storage.exists("jobs/a/train.log")


def test_put_dir_and_get_dir_round_trip(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    assert storage.put_dir(src, "jobs/j") == 2
    dest = tmp_path / "dest"
    assert storage.get_dir("jobs/j", dest) == 2
    assert (dest / "sub" / "b.txt").read_text() == "b"


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a\x00b", "C:/x"])
def test_traversal_is_refused(storage, bad):
    with pytest.raises(InvalidInput):
        storage.write_bytes(bad, b"x")
    with pytest.raises(InvalidInput):
        storage.open(bad)


def test_clean_path_normalises():
    assert clean_path("jobs//a/./b") == "jobs/a/b"


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves the previous file intact and no temp file behind."""
    storage = Storage(tmp_path / "s")
    storage.write_bytes("f.bin", b"old")

    class Boom(bytes):
        pass

    import os

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        storage.write_bytes("f.bin", b"new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert storage.read_bytes("f.bin") == b"old"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["f.bin"]
    assert storage.local_path("f.bin") == (tmp_path / "s" / "f.bin").resolve()


def test_remote_storage_has_no_local_path():
    assert Storage("memory://kiln-x").local_path("a") is None
