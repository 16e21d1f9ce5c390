"""A worker on S3 storage (moto's S3 server, a real HTTP endpoint; s3fs as Kiln's client): jobs
run from local scratch synced to the bucket, and the scratch is gone once each job has ended."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from tests.integration.conftest import TINY, LiveService, free_port

pytestmark = pytest.mark.integration
BUCKET = "kiln-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def s3_service(s3_endpoint, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        mp.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    service = LiveService(tmp_path_factory.mktemp("s3live") / "var", storage_url=f"s3://{BUCKET}/kiln")
    try:
        yield service.start()
    finally:
        service.stop()
        mp.undo()


def test_job_scratch_is_removed_and_the_bucket_keeps_the_artifacts(s3_service):
    import boto3

    s = s3_service
    scratch = s.settings.cache_path / "jobs"
    for _ in range(2):
        done = s.wait(s.submit(TINY)["id"])
        assert done["status"] == "succeeded", (done, s.worker_log()[-3000:])
        keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket=BUCKET, Prefix=f"kiln/jobs/{done['id']}/")["Contents"]}
        assert {f"kiln/jobs/{done['id']}/{n}" for n in ("train.log", "metrics.jsonl", "checkpoints/best.pt",
                                                      "checkpoints/last.pt")} <= keys
        leftovers = sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []
        assert leftovers == [], f"the worker kept scratch of finished jobs: {leftovers}"
