"""The forward process: one per host, batches across web processes, restarts after a crash.

Real child processes on real unix sockets; results are compared with an in-process
Predictor on the same checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from web.serving.web_client import ForwardClient, ForwardDied, ForwardError

KEY = ("digits", 1)


@pytest.fixture
def address():
    d = tempfile.mkdtemp(prefix="kfwd", dir="/tmp")  # unix socket paths must stay short
    yield os.path.join(d, "forward.sock")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def client(address, **kw) -> ForwardClient:
    return ForwardClient(workers=kw.pop("workers", 1), max_batch_size=kw.pop("max_batch_size", 64),
                         max_delay_ms=kw.pop("max_delay_ms", 20.0), address=address, **kw)


def gone(pid: int, timeout: float = 20.0) -> bool:
    """The process exited (a zombie our test process has not reaped counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def inputs(desc: dict, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, desc["image_size"], desc["image_size"], desc["in_channels"]), dtype=np.uint8)


def test_clients_share_one_process_and_their_requests_share_forward_passes(address, trained):
    from ml.inference import Predictor

    a, b = client(address), client(address)
    try:
        desc = a.load(KEY, str(trained))
        assert b.load(KEY, str(trained)) == desc
        assert a.ping() == b.ping()  # one forward process for both "web processes"
        x = inputs(desc, 40)
        sent = [(c, c.run(KEY, str(trained), x[i:i + 1], 3)) for i, c in enumerate([a, b] * 20)]
        outs = [f.result(timeout=120) for _, f in sent]
        # some forward pass took requests from both clients at once
        members: dict[int, set] = {}
        for (c, _), out in zip(sent, outs):
            members.setdefault(out["batch_id"], set()).add(id(c))
        assert any(len(m) == 2 for m in members.values()), members
        assert sum(out["first"] for out in outs) == len(members)  # one "first" per forward pass
        local = Predictor.from_checkpoint(trained)
        expected_p, expected_i = local.top_k(local.infer(local.batch(x)), 3)
        for n, out in enumerate(outs):
            assert out["indices"] == [expected_i[n]]
            np.testing.assert_allclose(out["values"][0], expected_p[n], rtol=1e-4, atol=1e-6)
    finally:
        a.close()
        b.close()


def test_exits_when_the_last_client_leaves(address, trained):
    a, b = client(address), client(address)
    a.load(KEY, str(trained))
    pid = b.ping()
    a.close()
    time.sleep(0.5)
    assert not gone(pid, timeout=0.5), "b is still connected"
    b.close()
    assert gone(pid), "the forward process outlived its last client"
    assert not os.path.exists(address)


def test_a_killed_process_is_replaced_on_the_next_request(address, trained):
    a = client(address)
    try:
        desc = a.load(KEY, str(trained))
        first = a.ping()
        os.kill(first, signal.SIGKILL)
        assert gone(first)
        time.sleep(0.2)  # the reader thread sees EOF and fails whatever was in flight
        x = inputs(desc, 2)
        try:
            out = a.run(KEY, str(trained), x, 2).result(timeout=180)
        except ForwardDied:  # the kill raced with this request: the next one must work
            out = a.run(KEY, str(trained), x, 2).result(timeout=180)
        assert len(out["values"]) == 2
        assert a.ping() != first
    finally:
        a.close()


def test_a_bad_checkpoint_is_a_named_error_and_the_process_lives_on(address, trained, tmp_path):
    a = client(address)
    try:
        pid = a.ping()
        with pytest.raises(ForwardError) as err:
            a.load(("nope", 1), str(tmp_path / "missing.pt"))
        assert "missing.pt" in str(err.value)
        assert a.ping() == pid
        desc = a.load(KEY, str(trained))
        wrong = np.zeros((1, desc["image_size"], desc["image_size"], desc["in_channels"] + 1), np.uint8)
        with pytest.raises(ForwardError):  # a channel count the model cannot take: named, not fatal
            a.run(KEY, str(trained), wrong, 1).result(timeout=60)
        assert a.ping() == pid
    finally:
        a.close()


def test_private_process_per_client(trained):
    a = ForwardClient(workers=1, address=None)
    try:
        desc = a.load(KEY, str(trained))
        pid = a.ping()
        out = a.run(KEY, str(trained), inputs(desc, 3), 1).result(timeout=60)
        assert [len(v) for v in out["values"]] == [1, 1, 1]
    finally:
        a.close()
    assert gone(pid)



def test_registry_builds_run_in_the_forward_process(serve_settings, registry, trained, tmp_path):
    """What POST /v1/models does: the artifacts are written by the forward process, the row by the caller."""
    import hashlib

    import torch

    from web.serving.web_app import Serving
    from worker.errors import InvalidInput

    serving = Serving(serve_settings, registry.resolve_model)
    try:
        version = registry.register_checkpoint("remote", trained, build=serving.build_artifacts)
        folder = Path(serve_settings.storage) / "models/remote/1"
        assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.onnx", "model.pt", "model.safetensors"]
        assert version["classes"] == [str(i) for i in range(10)]
        assert hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest() == version["sha256"]
        runtime = json.loads((folder / "card.json").read_text())["runtime"]
        assert runtime["name"] in ("onnxruntime", "eager") and "eager" in runtime["measured"]
        assert runtime.get("sha256") in (None, hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest())
        torch.save({"model": {}}, tmp_path / "foreign.pt")
        with pytest.raises(InvalidInput, match="not a Kiln training checkpoint"):
            registry.register_checkpoint("remote", tmp_path / "foreign.pt", build=serving.build_artifacts)
    finally:
        serving.close()
