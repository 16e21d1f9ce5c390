"""`make run`: the whole service on the embedded default, in the foreground.

Starts a private Redis on a unix socket under KILN_HOME (default ./var), upgrades the
SQLite job store, creates an admin token on first start, then runs gunicorn (web,
127.0.0.1:8000) and one Celery worker. A crashed child is restarted; Ctrl-C (or SIGTERM)
stops every process it started. Its children die with it even when it is killed outright
(a parent-death signal), and KILN_HOME/kiln.pid lets the next start find and clear what a
killed run left behind, or say in one line that Kiln already runs there.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from configs import Settings
from worker.procs import alive, cmdline, die_with_parent, end_group, stop_session
from worker.redis_server import RedisServer

log = logging.getLogger("kiln.embedded")
ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0


class Child:
    """A supervised child process in its own process group, sent ``death_signal`` if we die."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], death_signal: int):
        self.name, self.argv, self.env, self.death_signal = name, argv, env, death_signal
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        sig = self.death_signal
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, start_new_session=True,
                                     preexec_fn=lambda: die_with_parent(sig))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        stop_session(self.proc, timeout)


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.env())
    env["KILN_HOME"] = str(settings.home_path)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.home_path / "prometheus"))
    return env


def bind_address(env) -> str:
    """host:port the web tier listens on (KILN_BIND, else 127.0.0.1:PORT, PORT default 8000)."""
    return env.get("KILN_BIND") or f"127.0.0.1:{env.get('PORT', '8000')}"


def port_problem(bind: str) -> str | None:
    """One line saying why ``bind`` cannot be listened on, or None when it is free."""
    if bind.startswith("unix:"):
        return None
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
            s.bind((host, int(port)))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return (f"kiln: cannot listen on {bind} ({reason}). Another program uses that port: "
                f"start Kiln on another one with `PORT=8001 make run` (or KILN_BIND=host:port).")
    return None


# ------------------------------------------------------------------ the pid file
def pid_file(settings: Settings) -> Path:
    return settings.home_path / "kiln.pid"


def write_pid_file(settings: Settings, bind: str, children: dict[str, int]) -> None:
    path = pid_file(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "bind": bind, "children": children}))
    tmp.replace(path)


def clear_stale(settings: Settings) -> str | None:
    """A live Kiln on this KILN_HOME -> a one-line message; a dead one's leftovers are stopped."""
    path = pid_file(settings)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = None
    if info:
        pid = int(info.get("pid", 0))
        if pid != os.getpid() and alive(pid) and "worker.embedded" in cmdline(pid):
            return (f"kiln: Kiln is already running from {settings.home_path} (pid {pid}, "
                    f"http://{info.get('bind')}/). Stop it with Ctrl-C in its terminal or `kill {pid}`.")
        markers = {"redis": "redis-server", "web": "gunicorn", "worker": "celery"}
        for name, child in (info.get("children") or {}).items():
            child = int(child)
            if alive(child) and markers.get(name, "?") in cmdline(child):
                log.warning("stopping the %s (pid %d) a killed Kiln left running", name, child)
                end_group(child, signal.SIGKILL if name == "worker" else signal.SIGTERM)
        path.unlink(missing_ok=True)
    redis = RedisServer(settings.home_path)
    if settings.embedded_redis and redis.ping():
        log.warning("shutting down a Redis on %s that no running Kiln owns", redis.socket)
        redis.shutdown()
    return None


# ------------------------------------------------------------------ start and supervise
def prepare(settings: Settings) -> str | None:
    """Create directories, migrate the store and make sure an admin token exists."""
    settings.home_path.mkdir(parents=True, exist_ok=True)
    from worker.db import migrate

    migrate(settings)
    if not settings.auth_enabled:
        return None
    from worker.tokens import ensure_admin_token

    return ensure_admin_token(settings)


def wait_ready(web: Child, bind: str, timeout: float = READY_TIMEOUT_S) -> bool:
    """True once the web tier answers /health; False if it exits first."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and web.alive():
        try:
            with urllib.request.urlopen(f"http://{bind}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    settings.home_path.mkdir(parents=True, exist_ok=True)
    env = child_env(settings)
    bind = bind_address(env)
    problem = clear_stale(settings) or port_problem(bind)
    if problem:
        print(problem, file=sys.stderr, flush=True)
        return 1
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    redis, children = None, []
    try:
        if settings.embedded_redis:
            redis = RedisServer(settings.home_path).start()
            log.info("Redis %s", redis.url)
        token = prepare(settings)
        py = sys.executable
        children = [
            Child("web", [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"), "web.wsgi:app"], env,
                  signal.SIGTERM),
            # SIGKILL: as a lost worker host; its job's lease expires and the next worker resumes it
            Child("worker", [py, "-m", "celery", "-A", "worker.celery_main", "worker", "--loglevel=INFO", "-O",
                             "fair"], env, signal.SIGKILL),
        ]
        for child in children:
            child.start()

        def record() -> None:
            pids = {c.name: c.proc.pid for c in children if c.proc is not None}
            if redis is not None and redis.proc is not None:
                pids["redis"] = redis.proc.pid
            write_pid_file(settings, bind, pids)

        record()
        if not wait_ready(children[0], bind):
            if not stopping:
                print(f"kiln: the web tier did not start on {bind}; see the log above.", file=sys.stderr, flush=True)
            return 1
        banner = [f"Kiln is up: http://{bind}/  (dashboard, API under /v1, docs at /docs)",
                  f"  state: {settings.home_path}  broker: {settings.broker_url}"]
        if token:
            banner.append(f"  admin token: {token}")
            banner.append(f"  export KILN_URL=http://{bind} KILN_TOKEN={token}")
        banner.append("  Ctrl-C stops everything.")
        print("\n".join(banner), flush=True)
        while not stopping:
            time.sleep(0.5)
            for child in children:
                if not child.alive() and not stopping:
                    child.restarts += 1
                    if child.restarts > 5:
                        log.error("%s keeps exiting (code %s); stopping", child.name, child.proc.returncode)
                        stopping = True
                        break
                    log.warning("%s exited with %s; restarting", child.name, child.proc.returncode)
                    child.start()
                    record()
    finally:
        for child in reversed(children):
            child.stop()
        if redis is not None:
            redis.stop()
        pid_file(settings).unlink(missing_ok=True)
        print("Kiln stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
