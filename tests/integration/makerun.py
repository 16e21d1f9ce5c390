"""`make run` as a user starts it (python -m worker.embedded, every setting at its default but the
state folder and the port), with an authenticated HTTP session and a view of its process tree."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
