"""Overload and hangs over /predict: a full model queue is a 503 with Retry-After within milliseconds,
/ready says which version is full, and a forward process that stops answering is replaced."""
from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time

import numpy as np
import pytest

from tests.serving.test_forward import gone


@pytest.fixture
def own_forward(serve_settings):
    """Settings whose forward process is this test's alone (it gets stopped, filled or killed)."""
    folder = tempfile.mkdtemp(prefix="kfwd", dir="/tmp")  # unix socket paths must stay short
    yield dataclasses.replace(serve_settings, forward_socket=os.path.join(folder, "f.sock"))
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def app_with(settings, **serving_kw):
    from web import create_app
    from web.serving.web_app import EXTENSION, Serving

    app = create_app(settings)
    app.extensions[EXTENSION] = Serving(settings, app.extensions["kiln"].resolve_model, **serving_kw)
    return app


def test_a_full_model_queue_is_503_with_retry_after_at_once(own_forward, registered, digit_pngs):
    from web.serving.web_app import readiness

    app = app_with(dataclasses.replace(own_forward, predict_queue_max=1))  # KILN_PREDICT_QUEUE_MAX=1
    serving = app.extensions["kiln.serving"]
    client = app.test_client()
    try:
        ok = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
        assert ok.status_code == 200, ok.get_data(as_text=True)
        served = serving.models.get("digits@production")
        size, channels = served.model.image_size, served.model.in_channels
        # one forward pass of seconds holds the only forward worker; one more input waits behind it
        busy = served.model.submit(np.zeros((60_000, size, size, channels), np.uint8), 1)
        time.sleep(0.3)
        waiting = served.model.submit(np.zeros((1, size, size, channels), np.uint8), 1)
        t0 = time.monotonic()
        full = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
        elapsed = time.monotonic() - t0
        assert full.status_code == 503, full.get_data(as_text=True)
        assert full.get_json()["error"]["code"] == "queue_full" and full.headers["Retry-After"] == "1"
        assert elapsed < 1.0, f"refused after {elapsed:.3f} s"  # milliseconds when the machine is not shared
        deadline = time.monotonic() + 10  # the next heartbeat tells /ready (and the one after, once drained)
        with app.app_context():
            while (check := readiness()["model digits:1"])["ok"] and time.monotonic() < deadline:
                time.sleep(0.1)
        assert not check["ok"] and check["error"].startswith("QueueFull") and check["max_queue"] == 1, check
        assert len(busy.result(timeout=300)["values"]) == 60_000 and len(waiting.result(timeout=60)["values"]) == 1
        again = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
        assert again.status_code == 200 and again.get_json()["predictions"] == ok.get_json()["predictions"]
        deadline = time.monotonic() + 10
        with app.app_context():
            while not readiness()["model digits:1"]["ok"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert readiness()["model digits:1"]["ok"]
    finally:
        serving.close()


def test_a_stopped_forward_process_is_replaced_and_requests_succeed_again_within_seconds(own_forward, registered,
                                                                                        digit_pngs):
    """SIGSTOP (hung, not dead): the heartbeat notices, kills it; no request waits past the deadline."""
    from web.serving.web_client import HANG_S

    app = app_with(own_forward)
    serving = app.extensions["kiln.serving"]
    client = app.test_client()
    stopped = None
    try:
        ok = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
        assert ok.status_code == 200, ok.get_data(as_text=True)
        stopped = serving.forward.ping()
        os.kill(stopped, signal.SIGSTOP)
        t0, answers = time.monotonic(), []
        while time.monotonic() - t0 < 120:
            start = time.monotonic()
            resp = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
            answers.append((resp.status_code, round(time.monotonic() - start, 2)))
            if resp.status_code == 200:
                break
            assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0, resp.get_data(as_text=True)
        recovered = time.monotonic() - t0
        print(f"stopped forward process replaced; requests succeed again after {recovered:.1f} s: {answers}")
        assert answers[-1][0] == 200, answers
        assert resp.get_json()["predictions"] == ok.get_json()["predictions"]
        assert all(took < HANG_S + 5 for status, took in answers if status == 503), answers  # never a long wait
        assert recovered < 60, answers
        assert gone(stopped, timeout=10), "the hung process was killed"
        assert serving.forward.ping() != stopped
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
                os.kill(stopped, signal.SIGCONT)
            except OSError:
                pass
        serving.close()


def test_readiness_names_each_served_version(own_forward, registered, digit_pngs):
    from web.serving.web_app import readiness

    app = app_with(own_forward)
    try:
        with app.app_context():
            assert readiness() == {}  # nothing served yet: nothing to report (and no process started)
        client = app.test_client()
        for ref in ("digits:1", "digits:2"):
            assert client.post(f"/predict?model={ref}", data=digit_pngs[0][0], content_type="image/png").status_code \
                == 200
        with app.app_context():
            checks = readiness()
        assert set(checks) == {"model digits:1", "model digits:2"}
        assert all(c["ok"] and c["queued"] == 0 and c["runtime"] in ("eager", "onnxruntime") for c in checks.values())
    finally:
        app.extensions["kiln.serving"].close()
