"""Web process: ``ForwardClient``, one connection to the forward process (``python -m web.serving.forward_process``).

No torch here: request threads send uint8 arrays and get top-k rows back (see forward_process.py),
framed by wire.py. ``SocketPlace`` says where the host's shared forward process listens.
"""
from __future__ import annotations

import fcntl
import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ml.files import atomic_write
from web.serving import wire
from worker.errors import Unavailable

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0   # importing torch and loading a model on a busy small machine
SOCKET_NAME = "forward.sock"
MAX_SOCKET_PATH = 100     # sun_path holds 108 bytes, its NUL included
HELLO_TIMEOUT_S = 30.0    # a live forward process greets a new connection at once


class ForwardError(RuntimeError):
    """The forward process could not run a request (bad checkpoint, shape mismatch, out of memory...).

    ``kind`` is the exception's class name there (``QueueFull`` when too many requests wait).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.detail = kind, message


class ForwardDied(Unavailable):
    """The forward process exited or stopped answering (503); the next call starts or reaches a new one."""


class SocketPlace:
    """Where the host's shared forward process listens: a socket file (0600) in a directory only
    this user can enter, found the same way by every web process of the host.

    By default that is ``<home>/forward/forward.sock``. A home too long for a unix socket path
    gets a directory from ``tempfile.mkdtemp`` (unpredictable name, mode 0700) whose path is
    recorded in ``<home>/forward/address``; an explicit ``path`` (KILN_FORWARD_SOCKET) must sit
    in a directory of this user's with mode 0700 (created so if missing).
    """

    def __init__(self, *, home: str | os.PathLike | None = None, path: str | None = None):
        if (home is None) == (path is None):
            raise ValueError("SocketPlace takes a home or an explicit socket path")
        self.explicit = None if path is None else os.path.abspath(path)
        self.folder = Path(self.explicit).parent if self.explicit else Path(home) / "forward"

    @classmethod
    def from_settings(cls, settings) -> "SocketPlace | None":
        """The settings' place for the shared forward process; None for one private process per web process."""
        if settings.forward_socket == "private":
            return None
        if settings.forward_socket:
            return cls(path=settings.forward_socket)
        return cls(home=settings.home_path)

    def find(self) -> str | None:
        """The socket path to try now (None: none is recorded yet, or the recorded one is not safe)."""
        if self.explicit:
            return self.explicit
        path = self.folder / SOCKET_NAME
        if len(str(path)) <= MAX_SOCKET_PATH:
            return str(path)
        try:
            recorded = Path((self.folder / "address").read_text().strip())
            wire.private_dir(recorded.parent, ours=False, create=False)  # ours, 0700, not a link: else afresh
        except (OSError, ValueError):
            return None
        return str(recorded)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held by the one web process that starts the forward process; the others wait, then connect."""
        wire.private_dir(self.folder, ours=self.explicit is None)
        name = f"{SOCKET_NAME}.lock" if self.explicit is None else f"{Path(self.explicit).name}.lock"
        with open(self.folder / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def claim(self) -> str:
        """The socket path a new forward process should listen on (call with ``lock`` held)."""
        path = self.find()
        if path is not None:
            return path
        folder = wire.private_dir(tempfile.mkdtemp(prefix="kiln-fwd-"))  # mkdtemp makes it 0700
        path = str(folder / SOCKET_NAME)
        if len(path) > MAX_SOCKET_PATH:
            raise OSError(f"no short socket path: {path} is over {MAX_SOCKET_PATH} bytes; set TMPDIR or "
                          "KILN_FORWARD_SOCKET to a shorter place")
        atomic_write(self.folder / "address", path.encode(), mode=0o600)
        return path


class ForwardClient:
    """One web process's connection to a forward process; any number of requests in flight.

    ``address`` is the host's shared forward process (a ``SocketPlace`` or an explicit socket
    path, started on demand), or None for a private child on a socket pair. Replies are
    matched to requests by id on a reader thread, so request threads only wait on their own
    future. ``workers``, ``max_batch_size``, ``max_delay_ms``, ``max_models`` and ``device``
    configure a forward process this client starts.
    """

    def __init__(self, *, workers: int = 1, max_batch_size: int = 32, max_delay_ms: float = 5.0,
                 max_models: int = 4, device: str | None = None, address: SocketPlace | str | None = None):
        self.workers, self.device = max(1, int(workers)), device
        self.address = SocketPlace(path=address) if isinstance(address, str) else address
        self.max_batch_size, self.max_delay_ms = int(max_batch_size), float(max_delay_ms)
        self.max_models = max(1, int(max_models))
        self._lock = threading.Lock()           # connection state + sends
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._closed = False

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

    def load(self, key: tuple[str, int], path: str) -> dict:
        """Load the model at ``path`` under ``key`` (idempotent); returns its description."""
        return self.call("load", list(key), str(path))

    def run(self, key: tuple[str, int], path: str, arrays: Any, top_k: int) -> Future:
        """uint8 [N,S,S,C] -> future of {"values", "indices", "batch", "batch_id", "first", "wait_s"}.

        ``path`` lets a restarted forward process load the model again by itself.
        """
        return self.submit("run", list(key), str(path), int(top_k), array=arrays)

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

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection("the forward process connection is closed")

    # --------------------------------------------------------------- plumbing
    def _argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "web.serving.forward_process", "--workers", str(self.workers),
                "--max-batch-size", str(self.max_batch_size), "--max-delay-ms", str(self.max_delay_ms),
                "--max-models", str(self.max_models), "--device", self.device or "", *extra]

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
            sock = ours
        else:
            sock = self._shared_socket()
        self._sock = sock
        threading.Thread(target=self._read, args=(sock,), name="kiln-forward-reader", daemon=True).start()
        return sock

    def _shared_socket(self) -> socket.socket:
        """Connect to the host's forward process, starting it (once per host) if nobody has."""
        place = self.address
        path = place.find()
        if path is not None:
            try:
                return _connect_unix(path)
            except (ConnectionError, FileNotFoundError):
                pass
        with place.lock():  # one starter per host; the others wait, then connect
            path = place.claim()
            try:
                return _connect_unix(path)
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
                    return _connect_unix(path)
                except (ConnectionError, FileNotFoundError):
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        raise OSError(f"forward process did not start (exit code {self._proc.poll()})") from None
                    time.sleep(0.05)

    def _read(self, sock: socket.socket) -> None:
        """Reader thread: resolve each reply's future; on EOF fail everything still pending."""
        while True:
            try:
                reply, _ = wire.recv(sock)
                rid, ok = reply["id"], reply["ok"]
            except (EOFError, OSError, KeyError) as exc:
                broke = isinstance(exc, (wire.ProtocolError, KeyError))
                with self._lock:
                    if self._sock is sock:
                        self._drop_connection(f"the forward process broke the protocol ({exc})" if broke
                                              else "the forward process exited")
                return
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is None or fut.cancelled():
                continue
            if ok:
                fut.set_result(reply.get("value"))
            else:
                kind, message = reply.get("error") or ("Error", "no detail")
                fut.set_exception(ForwardError(str(kind), str(message)))

    def _drop_connection(self, why: str) -> None:
        """Close the connection (lock held) and fail its requests; the next submit reconnects."""
        sock, self._sock = self._sock, None
        pending, self._pending = self._pending, {}
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


def _connect_unix(path: str) -> socket.socket:
    """A connection to the live forward process at ``path``: PermissionError if another user listens
    there, ConnectionRefusedError if the one there is exiting (no hello)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        wire.check_peer(s)
        # A killed process accepts connections into its backlog until its files close: only a
        # hello says that someone will answer.
        s.settimeout(HELLO_TIMEOUT_S)
        try:
            hello, _ = wire.recv(s)
        except EOFError:
            raise ConnectionRefusedError(f"the forward process on {path} is exiting") from None
        if hello.get("hello") != wire.HELLO:
            raise wire.ProtocolError(f"{path} is not a forward process of this version")
        s.settimeout(None)
    except OSError:
        s.close()
        raise
    return s
