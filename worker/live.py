"""LiveService and MakeRun: one live Kiln in child processes, for the live tests and the benchmarks.

LiveService: a real Redis, a migrated store, a real Celery worker and the web app under
gunicorn, each in its own process group, with helpers to kill and restart the worker and Redis.
MakeRun: `make run` itself (python -m worker.embedded) with its admin token and process tree.
Nothing here runs in a production process.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from configs import Settings
from configs.names import TERMINAL_STATES
from worker.db import make_engine, migrate
from worker.procs import kill_session, stop_session
from worker.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]  # the directory holding configs/, ml/, worker/, web/
# A small job on the defaults: only sizes and epochs differ (batch_size 32 gives 8 steps an epoch
# on 240 training images, so cancel and kill tests land inside an epoch).
TINY = {"data": {"image_size": 16, "subset": 300}, "training": {"epochs": 2, "batch_size": 32}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveService:
    """Processes of one live Kiln; helpers to kill and restart the worker and Redis.

    The heartbeat, lease, reconcile and progress intervals are shortened: the fault tests that use
    it measure how a dead worker or a lost message is recovered, and these are the knobs that bound
    it. The journeys (tests/integration/test_journeys.py) run `make run` with every default.
    """

    def __init__(self, home: Path, **overrides):
        self.home = home
        self.redis = RedisServer(Path(tempfile.mkdtemp(prefix="kr")))  # short unix socket path
        self.settings = Settings.for_home(home, redis_url=self.redis.url, auth_enabled=False, heartbeat_s=0.5,
                                          lease_timeout_s=4.0, reconcile_every_s=1.0, progress_every_s=0.2,
                                          **overrides)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.worker: subprocess.Popen | None = None
        self.web: subprocess.Popen | None = None
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._worker_runs = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.env())
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT)
        return env

    def start(self, worker: bool = True) -> "LiveService":
        """Redis, the migrated store and the web tier; and the Celery worker unless ``worker`` is False."""
        self.redis.start()
        migrate(self.settings)
        if worker:
            self.start_worker()
        self.start_web()
        return self

    # ---------------------------------------------------------------- worker
    def start_worker(self, wait: bool = True) -> None:
        self._worker_runs += 1
        out = open(self.logs / f"worker-{self._worker_runs}.log", "wb")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_main", "worker", "--pool", "prefork",
             "--concurrency", "1", "--loglevel", "INFO", "-O", "fair",
             "--hostname", f"kiln{self._worker_runs}@%h"],
            cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_for_log(f"worker-{self._worker_runs}.log", "ready", 60)

    def worker_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("worker-*.log")))

    def wait_for_log(self, name: str, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in (self.logs / name).read_text(errors="replace"):
                return
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"worker exited: {(self.logs / name).read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{needle!r} not in {name} after {timeout}s: {(self.logs / name).read_text()[-3000:]}")

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group (parent and children): no shutdown code runs."""
        kill_session(self.worker)

    def stop_worker(self) -> None:
        stop_session(self.worker, 30)

    # ------------------------------------------------------------------- web
    def start_web(self) -> None:
        out = open(self.logs / "web.log", "ab")
        self.web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "2",
             "--threads", "4", "--timeout", "60", "web.wsgi:app"],
            cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base_url + "/health", timeout=1).ok:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            if self.web.poll() is not None:
                raise RuntimeError((self.logs / "web.log").read_text()[-3000:])
            time.sleep(0.2)
        raise TimeoutError("gunicorn did not answer /health")

    # ----------------------------------------------------------------- redis
    def restart_redis(self) -> None:
        """SIGKILL Redis and start it again on the same dir (the append-only file keeps the queue)."""
        time.sleep(1.2)  # appendfsync everysec: let the last second reach the file, as a real crash might not
        self.redis.kill()
        self.redis.start()

    # ---------------------------------------------------------------- client
    def url(self, path: str) -> str:
        return self.base_url + path

    def submit(self, config: dict | None = None, kind: str = "train") -> dict:
        r = requests.post(self.url("/v1/jobs"), json={"kind": kind, "config": config or TINY}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = requests.get(self.url(f"/v1/jobs/{job_id}"), timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, statuses=TERMINAL_STATES, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s\n{self.worker_log()[-4000:]}")

    def stop(self) -> None:
        for proc in (self.web, self.worker):
            stop_session(proc, 20)
        self.redis.stop()
        make_engine(self.settings).dispose()
        shutil.rmtree(self.redis.directory, ignore_errors=True)


# ---------------------------------------------------------------- make run
def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (any session or group), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class MakeRun:
    """One `make run` on its own KILN_HOME and port."""

    def __init__(self, home: Path, port: int | None = None, **env: str):
        self.home, self.port = Path(home), port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home.parent / f"make-run-{self.port}.log"
        self.token = ""
        self.http = requests.Session()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") and k not in (
            "REDIS_URL", "DATABASE_URL", "STORAGE_URL", "PORT")}
        env.update(KILN_HOME=str(self.home), PORT=str(self.port), PYTHONPATH=str(ROOT), **self.extra_env)
        return env

    def launch(self, stdout=None) -> subprocess.Popen:
        """Start the process without waiting (its output goes to ``log_path`` unless ``stdout`` is given)."""
        out = stdout if stdout is not None else open(self.log_path, "ab")
        return subprocess.Popen([sys.executable, "-m", "worker.embedded"], cwd=ROOT, env=self.env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def launch_piped(self) -> subprocess.Popen:
        """Start it with its output in a pipe (for starts that are expected to refuse)."""
        return self.launch(stdout=subprocess.PIPE)

    def start(self, timeout: float = 240) -> "MakeRun":
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()[start:]
            if "Kiln is up" in text:
                self.token = re.search(r"admin token: (\S+)", text).group(1)
                self.http.headers["Authorization"] = f"Bearer {self.token}"
                self.wait_for_worker()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"make run exited with {self.proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"make run did not come up in {timeout}s:\n{self.log()[-4000:]}")

    def wait_for_worker(self, timeout: float = 120) -> None:
        """Until the Celery worker has said it is ready (jobs submitted before are fine too)."""
        deadline = time.monotonic() + timeout
        while "worker ready" not in self.log() and time.monotonic() < deadline:
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tree(self) -> set[int]:
        return descendants(self.proc.pid) if self.proc is not None else set()

    def url(self, path: str) -> str:
        return self.base_url + path

    # ------------------------------------------------------------------ API helpers
    def submit(self, config: dict, kind: str = "train") -> dict:
        r = self.http.post(self.url("/v1/jobs"), json={"kind": kind, "config": config}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.http.get(self.url(f"/v1/jobs/{job_id}"), timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 300,
             seen: list | None = None) -> dict:
        """Poll a job until it reaches one of ``statuses``; every answer is appended to ``seen``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if seen is not None:
                seen.append(job)
            if job["status"] in statuses:
                return job
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s\n{self.log()[-4000:]}")

    # ------------------------------------------------------------------ stopping
    def stop(self, timeout: float = 60) -> int | None:
        """Ctrl-C's way out (SIGINT), then SIGKILL if it hangs; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        tree = self.tree()
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
