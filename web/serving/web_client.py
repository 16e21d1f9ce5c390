"""Web process: ``ForwardClient``, one connection to the forward process (``python -m web.serving.forward_process``).

No torch here: request threads send uint8 arrays and get top-k rows back (see forward_process.py).
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from worker.errors import Unavailable

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0   # importing torch and loading a model on a busy small machine


class ForwardError(RuntimeError):
    """The forward process could not run a request (bad checkpoint, shape mismatch, out of memory...).

    ``kind`` is the exception's class name there (``QueueFull`` when too many requests wait).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.detail = kind, message


class ForwardDied(Unavailable):
    """The forward process exited or stopped answering (503); the next call starts or reaches a new one."""


class ForwardClient:
    """One web process's connection to a forward process; any number of requests in flight.

    ``address`` is the host's shared forward process (a unix socket, started on demand),
    or None for a private child on a socket pair. Replies are matched to requests by id
    on a reader thread, so request threads only wait on their own future. ``workers``,
    ``max_batch_size``, ``max_delay_ms`` and ``device`` configure a forward process this
    client starts.
    """

    def __init__(self, *, workers: int = 1, max_batch_size: int = 32, max_delay_ms: float = 5.0,
                 device: str | None = None, address: str | None = None):
        self.workers, self.device, self.address = max(1, int(workers)), device, address
        self.max_batch_size, self.max_delay_ms = int(max_batch_size), float(max_delay_ms)
        self._lock = threading.Lock()           # connection state + sends
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------------ calls
    def submit(self, *message) -> Future:
        """Send ``message``; the future resolves to its answer (ForwardError / ForwardDied on failure)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise ForwardDied("the forward process connection is closed")
            rid = next(self._ids)
            try:
                conn = self._connect()
                self._pending[rid] = fut
                conn.send((rid, *message))
            except OSError as exc:
                self._pending.pop(rid, None)
                self._drop_connection(f"could not reach the forward process ({exc})")
                raise ForwardDied(f"could not reach the forward process ({exc}); retry") from None
        return fut

    def call(self, *message, timeout: float = START_TIMEOUT_S):
        fut = self.submit(*message)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            raise ForwardDied(f"the forward process did not answer in {timeout:g} s") from None

    def load(self, key: tuple[str, int], path: str) -> dict:
        """Load the model at ``path`` under ``key`` (idempotent); returns its description."""
        return self.call("load", tuple(key), path)

    def run(self, key: tuple[str, int], path: str, arrays: Any, top_k: int) -> Future:
        """uint8 [N,S,S,C] -> future of {"values", "indices", "batch", "batch_id", "first", "wait_s"}.

        ``path`` lets a restarted forward process load the model again by itself.
        """
        return self.submit("run", tuple(key), path, arrays, int(top_k))

    def unload(self, key: tuple[str, int]) -> None:
        """This web process no longer needs ``key`` (the model stays while others use it)."""
        with self._lock:
            if self._conn is None:
                return
        try:
            self.call("unload", tuple(key), timeout=60)
        except (ForwardError, ForwardDied):
            pass

    def build(self, src: str, out_dir: str, **meta) -> dict:
        """``worker.registry.write_artifacts(src, out_dir, **meta)`` run in the forward process; its card."""
        return self.call("build", str(src), str(out_dir), meta)

    def ping(self) -> int:
        """The forward process's pid (starting or reaching it first)."""
        return self.call("ping")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection("the forward process connection is closed")

    # --------------------------------------------------------------- plumbing
    def _argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "web.serving.forward_process", "--workers", str(self.workers),
                "--max-batch-size", str(self.max_batch_size), "--max-delay-ms", str(self.max_delay_ms),
                "--device", self.device or "", *extra]

    def _env(self) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the web processes record the metrics
        return env

    def _connect(self) -> Connection:
        """The live connection (called with the lock held), starting the forward process if needed."""
        if self._conn is not None:
            return self._conn
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # forget a forward process we started that has exited
        if self.address is None:
            ours, theirs = socket.socketpair()
            try:
                self._proc = subprocess.Popen(self._argv("--fd", str(theirs.fileno())),
                                              pass_fds=(theirs.fileno(),), env=self._env(), stdin=subprocess.DEVNULL)
            finally:
                theirs.close()
            log.info("started private forward process %d (%d forward workers)", self._proc.pid, self.workers)
            sock = ours
        else:
            sock = self._shared_socket()
        conn = self._conn = Connection(sock.detach())
        threading.Thread(target=self._read, args=(conn,), name="kiln-forward-reader", daemon=True).start()
        return conn

    def _shared_socket(self) -> socket.socket:
        """Connect to the host's forward process, starting it (once per host) if nobody has."""
        try:
            return _connect_unix(self.address)
        except OSError:
            pass
        import fcntl

        os.makedirs(os.path.dirname(self.address), exist_ok=True)
        with open(self.address + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per host; the others wait, then connect
            try:
                return _connect_unix(self.address)
            except OSError:
                pass
            self._proc = subprocess.Popen(self._argv("--listen", self.address), env=self._env(),
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            # it outlives this connection (other web processes use it): reap it whenever it exits
            threading.Thread(target=self._proc.wait, name="kiln-forward-reaper", daemon=True).start()
            log.info("started forward process %d on %s (%d forward workers)", self._proc.pid, self.address,
                     self.workers)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    return _connect_unix(self.address)
                except OSError:
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        raise OSError(f"forward process did not start (exit code {self._proc.poll()})") from None
                    time.sleep(0.05)

    def _read(self, conn: Connection) -> None:
        """Reader thread: resolve each reply's future; on EOF fail everything still pending."""
        while True:
            try:
                rid, ok, value = conn.recv()
            except (EOFError, OSError):
                with self._lock:
                    if self._conn is conn:
                        self._drop_connection("the forward process exited")
                return
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is None or fut.cancelled():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(ForwardError(*value))

    def _drop_connection(self, why: str) -> None:
        """Close the connection (lock held) and fail its requests; the next submit reconnects."""
        conn, self._conn = self._conn, None
        pending, self._pending = self._pending, {}
        if conn is not None:
            try:  # shutdown first: close() alone leaves the reader thread's recv() holding it open
                with socket.socket(fileno=os.dup(conn.fileno())) as s:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()  # a private child sees EOF and exits; a shared one forgets us
            except OSError:
                pass
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ForwardDied(f"{why}; the next request starts or reaches a new one"))
        if self._proc is not None and self.address is None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _connect_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s
