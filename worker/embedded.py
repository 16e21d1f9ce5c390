"""`make run`: the whole service on the embedded default, in the foreground.

Starts a private Redis on a unix socket under KILN_HOME (default ./var), upgrades
the SQLite job store, creates an admin token on first start, then runs gunicorn
(web, 127.0.0.1:8000) and one Celery worker. A crashed child is restarted; Ctrl-C
(or SIGTERM) stops every process it started and leaves nothing running.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from configs import Settings
from worker.redis_server import RedisServer

log = logging.getLogger("kiln.embedded")
ROOT = Path(__file__).resolve().parent.parent


class Child:
    """A supervised child process in its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name, self.argv, self.env = name, argv, env
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.env())
    env["KILN_HOME"] = str(settings.home_path)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.home_path / "prometheus"))
    return env


def prepare(settings: Settings) -> str | None:
    """Create directories, migrate the store and make sure an admin token exists."""
    settings.home_path.mkdir(parents=True, exist_ok=True)
    from worker.db import migrate

    migrate(settings)
    if not settings.auth_enabled:
        return None
    from worker.tokens import ensure_admin_token

    return ensure_admin_token(settings)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    redis = None
    if settings.embedded_redis:
        redis = RedisServer(settings.home_path).start()
        log.info("Redis %s", redis.url)
    children: list[Child] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        token = prepare(settings)
        env = child_env(settings)
        py = sys.executable
        children = [
            Child("web", [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"), "web.wsgi:app"], env),
            Child("worker", [py, "-m", "celery", "-A", "worker.celery_main", "worker", "--loglevel=INFO", "-O", "fair"], env),
        ]
        for child in children:
            child.start()
        bind = env.get("KILN_BIND", f"127.0.0.1:{env.get('PORT', '8000')}")
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
    finally:
        for child in reversed(children):
            child.stop()
        if redis is not None:
            redis.stop()
        print("Kiln stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
