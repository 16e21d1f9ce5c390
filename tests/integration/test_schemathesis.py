"""Schemathesis against the live web tier with auth on: every check, every phase (stateful included).

The service is worker.live's (real Redis, migrated store, gunicorn) without a Celery worker:
jobs the fuzzer submits stay queued, so the run measures the HTTP API, not hours of training
on two shared cores. The run is bounded (examples per operation, a fixed seed).

Where a schema-valid request may still be refused, the schema cannot say why: a row must exist
(an uploaded dataset id, a registered model), a time must be in the future, a file must really
be a zip or an image. For those operations positive data may also get 422, and the custom check
below (loaded into schemathesis as its hooks module) holds each such 422 to exactly those reasons.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import requests
import schemathesis

from worker.live import ROOT, LiveService
from worker.tokens import TokenStore

pytestmark = pytest.mark.integration
EXAMPLES = int(os.environ.get("KILN_SCHEMATHESIS_EXAMPLES", "15"))

# operation -> what alone may refuse schema-valid data with 422: detail fields, or error codes
STATEFUL_FIELDS = {
    "POST /v1/jobs": {"fields": {"data.dataset", "model", "data.root", "model.weights"},  # must exist / be allowed
                      # a sweep's rules across fields and each drawn trial's config (configs.sweep.SweepConfig)
                      "prefixes": ("space.", "base.", "halving.rungs", "trials")},
    "POST /v1/tokens": {"fields": {"expires_at"}},  # must be in the future
    "POST /v1/datasets": {"codes": {"not_a_zip", "invalid_dataset"}},  # the bytes must be a real ImageFolder zip
    "POST /predict": {"codes": {"not_an_image", "corrupt_image", "image_too_large", "empty_image",
                                "invalid_base64", "bad_shape", "bad_input", "bad_top_k", "too_many_images"}},
}
CONFIG = """
cache = { enabled = false }  # nothing written into the project folder; each run starts afresh

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
""" + "".join(f"""
[[operations]]
include-method = "{key.split()[0]}"
include-path = "{key.split()[1]}"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
""" for key in STATEFUL_FIELDS) + """
# A follow stream of a job that stays queued lasts KILN_LOG_FOLLOW_MAX_S (600 s) by design; its
# bounds and departures are tested in tests/api/test_hostile_streams.py and tests/ops/test_live_streams.py.
[[operations]]
include-method = "GET"
include-path = "/v1/jobs/{job_id}/logs"
parameters = { "query.follow" = "false" }
"""


@schemathesis.check
def valid_data_refused_only_for_state(ctx, response, case):
    """A schema-valid request answered 422 names only what the schema cannot say (STATEFUL_FIELDS)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    allowed = STATEFUL_FIELDS.get(f"{case.operation.method.upper()} {case.operation.path}")
    if allowed is None:
        return None  # the built-in positive_data_acceptance fails these already
    error = response.json()["error"]
    if "codes" in allowed:
        if error["code"] not in allowed["codes"]:
            raise AssertionError(f"schema-valid data refused with {error['code']}: {error['message']}")
        return None
    fields = {d.get("field") for d in error.get("details") or [] if isinstance(d, dict)}
    prefixes = allowed.get("prefixes", ())
    if not fields or not all(f in allowed["fields"] or (prefixes and str(f).startswith(prefixes)) for f in fields):
        raise AssertionError(f"schema-valid data refused for {sorted(fields)}: {error['message']}")
    return None


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz") / "var"
    service = LiveService(home)
    service.settings = dataclasses.replace(service.settings, auth_enabled=True)
    try:
        service.start(worker=False)
        token = TokenStore.from_settings(service.settings).create("fuzzer", ["admin"])[0]
        yield service, token
    finally:
        service.stop()


def test_schemathesis_finds_nothing(fuzz_target, tmp_path):
    service, token = fuzz_target
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.test_schemathesis", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
           service.url("/openapi.json"), "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
           "--max-examples", str(EXAMPLES), "--seed", "20240611", "--workers", "1",
           "--header", f"Authorization: Bearer {token}", "--request-timeout", "30",
           "--suppress-health-check", "all", "--no-color", "--warnings", "off", "--generation-database", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-15000:]
    assert "Stateful" in out and "Coverage" in out and "Fuzzing" in out, out[-3000:]
    # the admin token the fuzzer used still works: no request revoked or broke it
    ok = requests.get(service.url("/v1/tokens"), headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert ok.status_code == 200
