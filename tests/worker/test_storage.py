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


def opened_paths(storage, monkeypatch) -> list[str]:
    """Record every path storage's filesystem opens from now on."""
    seen, real = [], storage.fs.open

    def spy(path, *args, **kwargs):
        seen.append(str(path).rsplit("/", 1)[-1])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(storage.fs, "open", spy)
    return seen


def test_recorded_checksums_are_listed_without_reading_bodies(storage, tmp_path, monkeypatch):
    from worker.jobsync import DirSync
    from worker.storage import INDEX

    storage.write_recorded("jobs/a", "config.yaml", b"model: {}\n")
    work = storage.local_path("jobs/a") or tmp_path / "scratch"
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    (work / "checkpoints" / "last.pt").write_bytes(b"w" * 5000)
    (work / "train.log").write_bytes(b"epoch 1\n")
    sync = DirSync(storage, work, "jobs/a")
    assert sync.sync_now() == (3 if storage.is_local else 2)  # local: config.yaml is in the folder
    opened = opened_paths(storage, monkeypatch)
    items = storage.list("jobs/a")
    assert opened == [INDEX], "listing read object bodies"
    assert {i["name"]: i["sha256"] for i in items} == {
        "config.yaml": hashlib.sha256(b"model: {}\n").hexdigest(),
        "checkpoints/last.pt": hashlib.sha256(b"w" * 5000).hexdigest(),
        "train.log": hashlib.sha256(b"epoch 1\n").hexdigest()}

    (work / "train.log").write_bytes(b"epoch 1\nepoch 2\n")
    assert sync.sync_now() == 1 and sync.sync_now() == 0  # only what changed
    opened.clear()
    assert {i["name"]: i["sha256"] for i in storage.list("jobs/a")}["train.log"] == \
        hashlib.sha256(b"epoch 1\nepoch 2\n").hexdigest()
    assert opened == [INDEX]


def test_an_unrecorded_or_rewritten_object_is_hashed(storage, monkeypatch):
    storage.write_recorded("jobs/b", "x.txt", b"one")
    storage.write_bytes("jobs/b/x.txt", b"two")  # rewritten without a record
    storage.write_bytes("jobs/b/y.txt", b"why")
    opened = opened_paths(storage, monkeypatch)
    assert storage.list("jobs/b") == [
        {"name": "x.txt", "size": 3, "sha256": hashlib.sha256(b"two").hexdigest()},
        {"name": "y.txt", "size": 3, "sha256": hashlib.sha256(b"why").hexdigest()}]
    assert sorted(opened) == [".sha256.json", "x.txt", "y.txt"]


def test_background_rounds_do_not_hold_up_the_caller_and_close_waits(storage, tmp_path, monkeypatch):
    import threading
    import time

    from worker.jobsync import DirSync

    work = tmp_path / "work"
    work.mkdir()
    sync = DirSync(storage, work, "jobs/c")
    sync.remote = True  # upload even when storage is local, as for a bucket
    gate, real = threading.Event(), storage.upload

    def slow_upload(local, path):
        gate.wait(10)
        return real(local, path)

    monkeypatch.setattr(storage, "upload", slow_upload)
    sync.start()
    (work / "last.pt").write_bytes(b"epoch 1")
    t0 = time.perf_counter()
    sync.request()
    assert time.perf_counter() - t0 < 0.05  # the training loop goes on while the round waits
    (work / "last.pt").write_bytes(b"epoch 2!")
    gate.set()
    sync.close()  # waits for the round in flight, then the last round sends epoch 2
    assert storage.read_bytes("jobs/c/last.pt") == b"epoch 2!"
    assert storage.list("jobs/c") == [{"name": "last.pt", "size": 8,
                                       "sha256": hashlib.sha256(b"epoch 2!").hexdigest()}]


def test_a_listing_raced_by_another_writer_is_taken_again(storage, monkeypatch):
    """Another host rewrites an object between the listing and the read of its body (s3fs then
    raises FileExpired, an OSError): the listing is taken again and names the new body."""
    storage.write_bytes("jobs/a/train.log", b"old\n")
    real_open, raced = storage.fs.open, []

    def open_racing(path, mode="rb", **kw):
        if not raced:
            raced.append(path)
            storage.write_bytes("jobs/a/train.log", b"newer body\n")
            raise OSError(f"remote file {path} changed while it was read")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(storage.fs, "open", open_racing)
    items = storage.list("jobs/a")
    assert raced and items == [{"name": "train.log", "size": 11,
                                "sha256": hashlib.sha256(b"newer body\n").hexdigest()}]


def test_a_listing_that_never_settles_is_a_503_not_a_500(storage, monkeypatch):
    from worker.errors import Unavailable

    storage.write_bytes("jobs/a/train.log", b"x")

    def always_changed(path, mode="rb", **kw):
        raise OSError("changed again")

    monkeypatch.setattr(storage.fs, "open", always_changed)
    with pytest.raises(Unavailable, match="kept changing"):
        storage.list("jobs/a")


def test_a_read_raced_by_another_writer_is_taken_again(storage, monkeypatch):
    """Another host replaces an object while it is read (s3fs raises FileExpired, an OSError with EBUSY,
    seen as a 500 from GET /v1/jobs/<id>/metrics while a job ran): the new body is read instead."""
    import errno

    storage.write_bytes("jobs/a/metrics.jsonl", b'{"epoch": 1}\n')
    real_open, raced = storage.fs.open, []

    def open_racing(path, mode="rb", **kw):
        if not raced:
            raced.append(path)
            storage.write_bytes("jobs/a/metrics.jsonl", b'{"epoch": 1}\n{"epoch": 2}\n')
            raise OSError(errno.EBUSY, f"the remote file {path} no longer exists")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(storage.fs, "open", open_racing)
    assert storage.read_bytes("jobs/a/metrics.jsonl") == b'{"epoch": 1}\n{"epoch": 2}\n' and raced
    assert storage.read_bytes("jobs/a/metrics.jsonl", 13, 5) == b'{"epo'


def test_a_read_that_never_settles_is_a_503_and_a_missing_file_stays_missing(storage, monkeypatch):
    import errno

    from worker.errors import Unavailable

    storage.write_bytes("jobs/a/train.log", b"x")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("jobs/a/absent.log")

    def always_changed(path, mode="rb", **kw):
        raise OSError(errno.EBUSY, "changed again")

    monkeypatch.setattr(storage.fs, "open", always_changed)
    with pytest.raises(Unavailable, match="kept changing"):
        storage.read_bytes("jobs/a/train.log")


def test_a_checkpoint_written_after_the_epochs_round_lands_without_another_request(storage, tmp_path):
    """The background checkpoint writer may finish after the epoch's round: the sync thread looks at
    checkpoints/ between requests and sends the new file; other files wait for the next request."""
    import time

    from worker.jobsync import DirSync

    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    sync = DirSync(storage, work, "jobs/d", poll_s=0.05)
    sync.remote = True  # upload even when storage is local, as for a bucket
    sync.start()
    try:
        (work / "train.log").write_bytes(b"epoch 1\n")
        sync.request()  # the epoch's round, before the writer has written
        deadline = time.monotonic() + 10
        while not storage.exists("jobs/d/train.log") and time.monotonic() < deadline:
            time.sleep(0.01)
        (work / "checkpoints" / "last.pt").write_bytes(b"epoch 1 weights")
        (work / "train.log").write_bytes(b"epoch 1\nmore\n")
        while not storage.exists("jobs/d/checkpoints/last.pt") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storage.read_bytes("jobs/d/checkpoints/last.pt") == b"epoch 1 weights"
        assert storage.read_bytes("jobs/d/train.log") == b"epoch 1\n"  # not polled: the next epoch sends it
    finally:
        sync.close()
    assert storage.read_bytes("jobs/d/train.log") == b"epoch 1\nmore\n"
