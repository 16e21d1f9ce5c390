"""The `kiln` CLI against a real HTTP server (the app in a thread): error paths and plumbing."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from web import client as cli

ROOT = Path(__file__).resolve().parents[2]


def kiln(*args, env_extra=None, timeout=60) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (python -m web.client; the `kiln` script calls the same main)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_URL", "KILN_TOKEN", "KILN_HOME")}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "web.client", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def server(auth_app):
    """The app served over real HTTP on a free port, in a thread."""
    srv = make_server("127.0.0.1", 0, auth_app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    thread.join(5)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_token_is_one_line(server):
    line = one_line_error(kiln("--url", server, "--token", "kiln_nope", "jobs"))
    assert line.startswith("kiln: error: HTTP 401 unauthorized")


def test_missing_token_and_wrong_scope(server, scoped):
    line = one_line_error(kiln("--url", server, "jobs"))
    assert "401" in line and "tokens create" in line
    line = one_line_error(kiln("--url", server, "cancel", "0" * 32, env_extra={"KILN_TOKEN": scoped["read"]}))
    assert "HTTP 403 forbidden" in line and "submit" in line


def test_server_errors_are_one_line(server, scoped):
    env = {"KILN_URL": server, "KILN_TOKEN": scoped["admin"]}
    assert "HTTP 404 not_found" in one_line_error(kiln("status", "0" * 32, env_extra=env))
    bad = one_line_error(kiln("submit", str(ROOT / "configs/smoke.yaml"), "--set", "training.epochs=-1",
                              env_extra=env))
    assert "HTTP 422" in bad and "training.epochs" in bad
    assert "no such file" in one_line_error(kiln("datasets", "upload", "/nonexistent", env_extra=env))


def test_unreachable_server_is_one_line():
    line = one_line_error(kiln("--url", "http://127.0.0.1:9", "--token", "t", "jobs"))
    assert "cannot reach http://127.0.0.1:9" in line


def test_token_from_the_admin_token_file(server, tmp_path, scoped):
    (tmp_path / "admin-token").write_text(scoped["read"] + "\n")
    out = kiln("--url", server, "jobs", env_extra={"KILN_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "0 of 0 jobs" in out.stdout


def test_cli_imports_and_runs_without_flask():
    """The CLI speaks HTTP only: with flask (and torch) made unimportable it still loads and parses."""
    code = ("import sys; sys.modules['flask'] = None; sys.modules['torch'] = None; "
            "from web import client; client.build_parser().parse_args(['jobs']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'werkzeug', 'torch', 'celery')"
            " and sys.modules[m] is not None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bad_override_is_one_line_before_any_request(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("training: {epochs: 2}\n")
    err = one_line_error(kiln("--url", "http://127.0.0.1:9", "submit", str(cfg), "--set", "no-equals-sign"))
    assert "--set" in err and "cannot reach" not in err


def test_progress_line():
    line = cli.progress_line({"status": "running", "progress": {"epoch": 2, "epochs": 4, "percent": 50.0,
                                                                "eta_s": 75},
                              "metrics": {"latest": {"train_loss": 0.5, "val_accuracy": 0.9}}})
    assert "epoch 2/4" in line and "50.0%" in line and "loss 0.5" in line and "ETA 01:15" in line
    assert "############" in line


def test_zip_dir(tmp_path):
    import io
    import zipfile

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"x")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "b.png").write_bytes(b"y")
    names = zipfile.ZipFile(io.BytesIO(cli.zip_dir(tmp_path))).namelist()
    assert names == ["cats/a.png", "dogs/b.png"]
