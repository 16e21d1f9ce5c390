"""A worker on S3 storage (moto's S3 server, a real HTTP endpoint; s3fs as Kiln's client): jobs
run from local scratch synced to the bucket, and the scratch is gone once each job has ended."""
from __future__ import annotations

import pytest

from tests.integration.conftest import TINY, LiveService
from worker.topology import S3Server

pytestmark = pytest.mark.integration
BUCKET = "kiln-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server (worker.topology.S3Server), with the test bucket."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log").start(BUCKET)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_service(s3_endpoint, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        mp.setenv(key, value)
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
