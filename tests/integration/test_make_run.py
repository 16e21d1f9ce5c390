"""`make run` killed outright takes its whole tree with it; the next start clears what is left and
comes up; a second start on a live home, or on a taken port, says why in one line."""
from __future__ import annotations

import signal
import socket
import time

import pytest
import requests

from worker.live import MakeRun
from worker.procs import alive

pytestmark = pytest.mark.integration


def one_line(proc) -> str:
    out, _ = proc.communicate(timeout=120)
    text = out.decode() if isinstance(out, bytes) else (out or "")
    lines = [line for line in text.strip().splitlines() if " INFO " not in line]
    assert proc.returncode == 1, text
    assert "Traceback" not in text and len(lines) == 1, text
    return lines[0]


def test_sigkill_takes_the_tree_and_the_next_start_comes_up(tmp_path):
    run = MakeRun(tmp_path / "var").start()
    try:
        # a running job: its job process (and DataLoader workers) belong to the tree too
        job = run.submit({"data": {"subset": 600}, "training": {"epochs": 200}})
        run.wait(job["id"], statuses=("running",), timeout=120)
        deadline = time.monotonic() + 60
        while (run.job(job["id"])["progress"]["step"] or 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        tree = run.tree()
        assert len(tree) >= 5, tree  # redis, gunicorn master + workers, celery main + pool child + job process
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if alive(p)], "processes outlived make run"
        with pytest.raises(requests.ConnectionError):
            requests.get(run.url("/health"), timeout=2)

        run.start()  # same home, same port: comes up, and the interrupted job is resumed or queued
        assert run.http.get(run.url("/health"), timeout=10).status_code == 200
        assert run.job(job["id"])["status"] in ("queued", "running")
        r = run.http.post(run.url(f"/v1/jobs/{job['id']}/cancel"), timeout=30)
        assert r.status_code == 200

        # a second make run on the same home: one line naming the live one
        second = MakeRun(run.home)
        line = one_line(second.launch_piped())
        assert "already running" in line and str(run.proc.pid) in line

        # another home on the live one's port: refused, though each web process binds it with SO_REUSEPORT
        elsewhere = MakeRun(run.home.parent / "other", port=run.port)
        line = one_line(elsewhere.launch_piped())
        assert f"127.0.0.1:{run.port}" in line and "PORT=" in line
        assert run.http.get(run.url("/health"), timeout=10).status_code == 200
    finally:
        run.stop()
    assert run.proc.returncode == 0


def test_a_taken_port_is_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = MakeRun(tmp_path / "var", port=port)
        line = one_line(run.launch_piped())
        assert f"127.0.0.1:{port}" in line and "PORT=" in line
    assert not (tmp_path / "var" / "redis.sock").exists()  # nothing was started
