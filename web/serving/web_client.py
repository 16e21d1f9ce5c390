"""Web process: ``ForwardClient``, one connection to the forward process, with a heartbeat that tells hung from busy.

Request threads send uint8 arrays and get top-k rows back (no torch here); a forward process that stops
answering is killed, and the next request starts a new one.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from web.serving import wire
from web.serving.web_place import SocketPlace, connect_unix
from worker.errors import Unavailable

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0   # importing torch and loading a model on a busy small machine
HEARTBEAT_S = 1.0         # how often a connected web process asks the forward process how it is
HANG_S = 5.0              # nothing heard for this long while a heartbeat waits: hung, so killed and replaced
STUCK_S = 120.0           # one forward pass running this long is stuck inside its runtime: the same


class ForwardError(RuntimeError):
    """The forward process could not run a request (bad checkpoint, shape mismatch, out of memory...).

    ``kind`` is the exception's class name there (``QueueFull`` when too many inputs wait for the model).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.detail = kind, message


class ForwardDied(Unavailable):
    """The forward process exited or stopped answering (503); the next call starts or reaches a new one."""


class ForwardClient:
    """One web process's connection to a forward process; any number of requests in flight.

    ``address`` is the host's shared forward process (a ``SocketPlace`` or an explicit socket
    path, started on demand), or None for a private child on a socket pair. Replies are
    matched to requests by id on a reader thread, so request threads only wait on their own
    future. ``workers``, ``max_batch_size``, ``max_delay_ms``, ``max_models``, ``max_queue`` and
    ``device`` configure a forward process this client starts. ``hang_s``: see HANG_S.
    """

    def __init__(self, *, workers: int = 1, max_batch_size: int = 32, max_delay_ms: float = 0.0,
                 max_models: int = 4, max_queue: int = 256, device: str | None = None,
                 address: SocketPlace | str | None = None, hang_s: float = HANG_S):
        self.workers, self.device = max(1, int(workers)), device
        self.address = SocketPlace(path=address) if isinstance(address, str) else address
        self.max_batch_size, self.max_delay_ms = int(max_batch_size), float(max_delay_ms)
        self.max_models, self.max_queue = max(1, int(max_models)), max(1, int(max_queue))
        self.hang_s = float(hang_s)
        self._lock = threading.Lock()           # connection state + sends
        self._sock: socket.socket | None = None
        self._peer_pid: int | None = None       # the forward process at the other end, as the kernel says
        self._proc: subprocess.Popen | None = None
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._heard = 0.0                       # when the last frame came from the forward process
        self.health: tuple[float, dict] | None = None  # (when, the last heartbeat's answer) on this connection

    # ------------------------------------------------------------------ calls
    def submit(self, op: str, *args, array=None) -> Future:
        """Send ``op(*args)`` (and one uint8 array); the future resolves to its answer
        (ForwardError / ForwardDied on failure)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise ForwardDied("the forward process connection is closed")
            rid = next(self._ids)
            try:
                sock = self._connect()
                self._pending[rid] = fut
                wire.send(sock, {"id": rid, "op": op, "args": list(args)}, array)
            except OSError as exc:
                self._pending.pop(rid, None)
                self._drop_connection(f"could not reach the forward process ({exc})")
                raise ForwardDied(f"could not reach the forward process ({exc}); retry") from None
        return fut

    def call(self, op: str, *args, timeout: float = START_TIMEOUT_S):
        fut = self.submit(op, *args)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            raise ForwardDied(f"the forward process did not answer in {timeout:g} s") from None

    def load(self, key: tuple[str, int], path: str, runtime: str | None = None) -> dict:
        """Load model.pt at ``path`` under ``key``, served by ``runtime`` (the card's choice; its file lies
        beside model.pt; None: eager). Idempotent; returns its description."""
        return self.call("load", list(key), str(path), runtime)

    def run(self, key: tuple[str, int], path: str, arrays: Any, top_k: int, runtime: str | None = None) -> Future:
        """uint8 [N,S,S,C] -> future of {"values", "indices", "batch", "batch_id", "first", "wait_s"}.

        ``path`` and ``runtime`` (as for ``load``) let a restarted forward process load the version again.
        """
        return self.submit("run", list(key), str(path), int(top_k), runtime, array=arrays)

    def unload(self, key: tuple[str, int]) -> None:
        """This web process no longer needs ``key`` (the model stays while others use it)."""
        with self._lock:
            if self._sock is None:
                return
        try:
            self.call("unload", list(key), timeout=60)
        except (ForwardError, ForwardDied):
            pass

    def build(self, src: str, out_dir: str, **meta) -> dict:
        """``worker.registry.write_artifacts(src, out_dir, **meta)`` run in the forward process; its card."""
        return self.call("build", str(src), str(out_dir), meta)

    def ping(self) -> int:
        """The forward process's pid (starting or reaching it first)."""
        return self.call("ping")

    def loaded(self) -> list[tuple[str, int]]:
        """The model versions the forward process holds, least recently used first."""
        return [(name, version) for name, version in self.call("models")]

    def silent_s(self) -> float | None:
        """Seconds since the forward process last sent anything; None while not connected. Takes no lock
        (a request thread may hold it for seconds while a new forward process starts)."""
        return None if self._sock is None else time.monotonic() - self._heard

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection("the forward process connection is closed")

    # --------------------------------------------------------------- plumbing
    def _argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "web.serving.forward_process", "--workers", str(self.workers),
                "--max-batch-size", str(self.max_batch_size), "--max-delay-ms", str(self.max_delay_ms),
                "--max-models", str(self.max_models), "--max-queue", str(self.max_queue),
                "--device", self.device or "", *extra]

    def _env(self) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the web processes record the metrics
        return env

    def _connect(self) -> socket.socket:
        """The live connection (called with the lock held), starting the forward process if needed."""
        if self._sock is not None:
            return self._sock
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
            sock, self._peer_pid = ours, self._proc.pid
        else:
            sock = self._shared_socket()
            self._peer_pid = (wire.peer_pid_uid(sock) or (None, None))[0]
        self._sock, self._heard, self.health = sock, time.monotonic(), None
        threading.Thread(target=self._read, args=(sock,), name="kiln-forward-reader", daemon=True).start()
        threading.Thread(target=self._heartbeat, args=(sock,), name="kiln-forward-heartbeat", daemon=True).start()
        return sock

    def _shared_socket(self) -> socket.socket:
        """Connect to the host's forward process, starting it (once per host) if nobody has."""
        place = self.address
        path = place.find()
        if path is not None:
            try:
                return connect_unix(path)
            except (ConnectionError, FileNotFoundError):
                pass
        with place.lock():  # one starter per host; the others wait, then connect
            path = place.claim()
            try:
                return connect_unix(path)
            except (ConnectionError, FileNotFoundError):
                pass
            self._proc = subprocess.Popen(self._argv("--listen", path), env=self._env(),
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            # it outlives this connection (other web processes use it): reap it whenever it exits
            threading.Thread(target=self._proc.wait, name="kiln-forward-reaper", daemon=True).start()
            log.info("started forward process %d on %s (%d forward workers)", self._proc.pid, path, self.workers)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    return connect_unix(path)
                except (ConnectionError, FileNotFoundError):
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        raise OSError(f"forward process did not start (exit code {self._proc.poll()})") from None
                    time.sleep(0.05)

    def _read(self, sock: socket.socket) -> None:
        """Reader thread: resolve each reply's future; on EOF fail everything still pending."""
        reader = wire.Reader(sock)
        while True:
            try:
                reply, _ = reader.recv()
                rid, ok = reply["id"], reply["ok"]
            except (EOFError, OSError, KeyError) as exc:
                broke = isinstance(exc, (wire.ProtocolError, KeyError))
                with self._lock:
                    if self._sock is sock:
                        self._drop_connection(f"the forward process broke the protocol ({exc})" if broke
                                              else "the forward process exited")
                return
            self._heard = time.monotonic()
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is None or fut.cancelled():
                continue
            if ok:
                fut.set_result(reply.get("value"))
            else:
                kind, message = reply.get("error") or ("Error", "no detail")
                fut.set_exception(ForwardError(str(kind), str(message)))

    def _heartbeat(self, sock: socket.socket) -> None:
        """While ``sock`` is the connection: ask for the forward process's health every HEARTBEAT_S; kill it
        when nothing at all has come from it for ``hang_s`` after asking, or a forward pass runs past STUCK_S."""
        while True:
            time.sleep(HEARTBEAT_S)
            asked = time.monotonic()
            with self._lock:
                if self._sock is not sock:
                    return
                rid = next(self._ids)
                fut = self._pending[rid] = Future()
                try:
                    wire.send(sock, {"id": rid, "op": "health", "args": []})
                except OSError:
                    pass  # the reader sees the connection go
            while not fut.done():
                try:
                    fut.result(timeout=min(self.hang_s, HEARTBEAT_S) / 4)
                except TimeoutError:
                    silent = time.monotonic() - max(asked, self._heard)
                    if silent > self.hang_s:
                        return self._kill(sock, f"no answer for {silent:.1f} s")
                except Exception:  # noqa: BLE001 - ForwardDied: the connection is gone
                    return
            if fut.exception() is None:
                health = fut.result()
                self.health = (time.monotonic(), health)
                if health.get("busy_s", 0) > STUCK_S:
                    return self._kill(sock, f"a forward pass has run for {health['busy_s']:.0f} s")

    def _kill(self, sock: socket.socket, why: str) -> None:
        """The forward process at the other end of ``sock`` is hung: kill it and fail what waits on it."""
        with self._lock:
            if self._sock is not sock:
                return
            pid = self._peer_pid
            log.error("forward process %s is hung (%s): killing it; the next request starts a new one", pid, why)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
                except OSError:
                    pass
            self._drop_connection(f"the forward process stopped answering ({why})")

    def _drop_connection(self, why: str) -> None:
        """Close the connection (lock held) and fail its requests; the next submit reconnects."""
        sock, self._sock = self._sock, None
        pending, self._pending = self._pending, {}
        self.health = None
        if sock is not None:
            try:  # shutdown first: close() alone leaves the reader thread's recv() holding it open
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()  # a private child sees EOF and exits; a shared one forgets us
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
