"""Storage on an S3 API server (moto's server mode, s3fs as the client), as hosts share a bucket:
what one host writes after another has listed is what the other lists and reads next."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import requests

from worker.storage import Storage

BUCKET = "kiln-storage-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    mp = pytest.MonkeyPatch()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses filesystems (and their endpoint) by arguments

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        proc.terminate()
        proc.wait(10)
        log.close()


def other_host_writes(url: str, files: dict[str, bytes], env: dict) -> None:
    """Write through a Storage in another process, as a worker host would."""
    code = ("import sys, json; from worker.storage import Storage; s = Storage(sys.argv[1]); "
            "[s.write_bytes(k, bytes.fromhex(v)) for k, v in json.loads(sys.argv[2]).items()]")
    import json
    import os

    subprocess.run([sys.executable, "-c", code, url, json.dumps({k: v.hex() for k, v in files.items()})],
                   check=True, env={**os.environ, **env}, timeout=60)


def test_a_reader_sees_what_another_host_writes_after_it_listed(s3_env):
    url = f"s3://{BUCKET}/kiln"
    web = Storage(url)
    assert web.list("jobs/j1") == [] and not web.exists("jobs/j1/train.log")
    other_host_writes(url, {"jobs/j1/train.log": b"epoch 1\n"}, s3_env)
    assert [i["name"] for i in web.list("jobs/j1", checksums=False)] == ["train.log"]
    assert web.read_bytes("jobs/j1/train.log") == b"epoch 1\n"

    other_host_writes(url, {"jobs/j1/train.log": b"epoch 1\nepoch 2\n",
                            "jobs/j1/metrics.jsonl": b"{}\n"}, s3_env)
    assert web.exists("jobs/j1/metrics.jsonl") and web.size("jobs/j1/train.log") == 16
    assert web.read_bytes("jobs/j1/train.log") == b"epoch 1\nepoch 2\n"
    with web.open("jobs/j1/train.log") as f:
        assert f.read() == b"epoch 1\nepoch 2\n"
    assert [(i["name"], i["size"]) for i in web.list("jobs/j1", checksums=False)] == [
        ("metrics.jsonl", 3), ("train.log", 16)]


def test_recorded_checksums_on_s3_list_without_reading_bodies(s3_env, tmp_path, monkeypatch):
    import hashlib

    from worker.jobsync import DirSync
    from worker.storage import INDEX

    storage = Storage(f"s3://{BUCKET}/kiln")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"w" * 70000)
    (tmp_path / "train.log").write_bytes(b"epoch 1\n")
    sync = DirSync(storage, tmp_path, "jobs/j2")
    assert sync.sync_now() == 2
    (tmp_path / "train.log").write_bytes(b"epoch 1\nepoch 2\n")
    assert sync.sync_now() == 1
    opened, real = [], storage.fs.open
    monkeypatch.setattr(storage.fs, "open",
                        lambda p, *a, **k: opened.append(p.rsplit("/", 1)[-1]) or real(p, *a, **k))
    listed = {i["name"]: i["sha256"] for i in storage.list("jobs/j2")}
    assert listed == {"checkpoints/last.pt": hashlib.sha256(b"w" * 70000).hexdigest(),
                      "train.log": hashlib.sha256(b"epoch 1\nepoch 2\n").hexdigest()}
    assert opened == [INDEX], "listing read object bodies"
