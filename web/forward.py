"""The forward process: dynamic batching and forward passes, away from the web threads' GIL.

A web process runs many request threads that parse HTTP, decode images and write
JSON: all Python, all taking the GIL in turn. An eager PyTorch forward pass in the
same process must take the GIL back after every operator; with busy request threads
each of those waits can last the interpreter's switch interval (5 ms), and a forward
pass that takes 10 ms alone took ten times longer under load. So forward passes run
in a process that does nothing else (``python -m web.forward``).

Request threads decode and validate their inputs, then send them (uint8 arrays
through the model's own transform) over one multiplexed connection per web process.
In the forward process one ``Batcher`` feeds forward workers (one intra-op thread
each) that take everything waiting whenever one of them is free, from every web
process on the host, one forward pass per model: batches are as large as the host's
traffic makes them, and a lone request runs at once. The forward process normalises,
runs the model under ``inference_mode`` and answers each request with its top-k rows.

By default all web processes of a host share one forward process on a unix socket
(``Settings.forward_address``). The first web process that needs it starts it (under a
file lock, so only one does); it exits when the last web process disconnects and is
started again on the next request if it ever dies. ``forward_socket = "private"``
gives each web process its own child on a socket pair. Only the forward process
imports torch.
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

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0   # importing torch and loading a model on a busy small machine
IDLE_EXIT_S = 60.0        # a shared forward process nobody connected to exits after this


class ForwardError(RuntimeError):
    """The forward process could not run a request (bad checkpoint, shape mismatch, out of memory...).

    ``kind`` is the exception's class name there (``QueueFull`` when too many requests wait).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.detail = kind, message


class ForwardDied(RuntimeError):
    """The forward process exited or stopped answering; the next call starts or reaches a new one."""


# ------------------------------------------------------------------- web side

class ForwardClient:
    """One web process's connection to a forward process; any number of requests in flight.

    ``address`` is the host's shared forward process (a unix socket, started on demand),
    or None for a private child on a socket pair. Replies are matched to requests by id
    on a reader thread, so request threads only wait on their own future.
    """

    def __init__(self, *, threads: int = 1, max_batch_size: int = 32, max_delay_ms: float = 5.0,
                 device: str | None = None, address: str | None = None):
        self.threads, self.device, self.address = max(1, int(threads)), device, address
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
        """uint8 [N,S,S,C] -> future of {"values", "indices", "batch", "wait_s", "first"}.

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

    def ping(self) -> int:
        """The forward process's pid (starting or reaching it first)."""
        return self.call("ping")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection("the forward process connection is closed")

    # --------------------------------------------------------------- plumbing
    def _argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "web.forward", "--threads", str(self.threads),
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
            log.info("started private forward process %d (%d forward threads)", self._proc.pid, self.threads)
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
            log.info("started forward process %d on %s (%d forward threads)", self._proc.pid, self.address,
                     self.threads)
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


# -------------------------------------------------------------- forward process

class _Client:
    """A connected web process: its connection, a send lock, the models it asked for."""

    def __init__(self, conn: Connection):
        self.conn, self.lock, self.keys = conn, threading.Lock(), set()

    def reply(self, rid: int, ok: bool, value) -> None:
        try:
            with self.lock:
                self.conn.send((rid, ok, value))
        except OSError:
            pass  # the web process is gone; the I/O thread sees EOF and forgets it


class _Job:
    """One request inside the forward process."""

    __slots__ = ("client", "rid", "key", "path", "arrays", "top_k", "received")

    def __init__(self, client: _Client, rid: int, key: tuple, path: str, arrays, top_k: int):
        self.client, self.rid, self.key, self.path = client, rid, key, path
        self.arrays, self.top_k = arrays, top_k
        self.received = time.monotonic()

    def __len__(self) -> int:
        return len(self.arrays)


class _Server:
    """An I/O thread reads requests into one Batcher; ``threads`` workers run the forwards.

    Worker 0 is the process's main thread and always gets work first; the others take
    batches only while it is busy. Under load every worker runs its forward passes on
    one core: several concurrent single-threaded forwards scale better on CPUs than one
    forward with several intra-op threads, and never stall on a pool thread that another
    process preempted. A small request that finds the main thread otherwise idle runs
    with all of ``cores`` as intra-op threads instead: the latency of an idle machine
    (OpenMP teams are only fast on the main thread).
    """

    LONE_MAX_IMAGES = 2

    def __init__(self, threads: int, max_batch_size: int, max_delay_ms: float, device: str, cores: int):
        import queue

        import torch

        from web.batcher import Batcher

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cores = max(1, cores)
        torch.set_num_threads(1)
        self.intra = 1  # the main thread's intra-op threads right now
        self.busy = 0   # workers inside a forward pass
        self.batch_ids = itertools.count(1)  # numbers each forward pass (answers carry it)
        self.models: dict[tuple, Any] = {}  # key -> Predictor
        self.clients: dict[Connection, _Client] = {}
        self.lock = threading.Lock()        # models, clients, client.keys, busy
        self.main = threading.current_thread()  # runs worker 0
        self.local = threading.local()
        self.batcher = Batcher(self._run_batch, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                               size=len, workers=max(1, threads) - 1, external_primary=True, name="forward")
        self.control: queue.Queue = queue.Queue()  # model loads are slow: a control thread does them
        self.path_inode: int | None = None
        threading.Thread(target=self._control_loop, name="forward-control", daemon=True).start()

    # ----------------------------------------------------------- models
    def model(self, key: tuple, path: str):
        """The Predictor for ``key``, loading it on first use."""
        from ml.inference import Predictor

        with self.lock:
            predictor = self.models.get(key)
        if predictor is None:
            predictor = Predictor.from_checkpoint(path, device=self.device)
            with self.lock:
                predictor = self.models.setdefault(key, predictor)
            log.info("loaded model %s version %s from %s", key[0], key[1], path)
        return predictor

    def release(self, key: tuple, client: _Client) -> None:
        """``client`` no longer needs ``key``; the model goes when no client does."""
        with self.lock:
            client.keys.discard(key)
            if any(key in c.keys for c in self.clients.values()):
                return
            dropped = self.models.pop(key, None)
        if dropped is not None:  # a request still queued for it loads it again from its path
            log.info("unloaded model %s version %s", key[0], key[1])

    def add(self, conn: Connection) -> None:
        with self.lock:
            self.clients[conn] = _Client(conn)

    def forget(self, conn: Connection) -> None:
        with self.lock:
            client = self.clients.pop(conn, None)
        if client is not None:
            for key in list(client.keys):
                self.release(key, client)
        conn.close()

    # ---------------------------------------------------------- forwards
    def _run_batch(self, jobs: list[_Job]) -> list[dict]:
        """One forward pass per model among ``jobs`` (a batch is usually one model)."""
        import numpy as np

        with self.lock:
            self.busy += 1
            alone = self.busy == 1
        try:
            start_t = time.monotonic()
            groups: dict[tuple, list[int]] = {}
            for n, job in enumerate(jobs):
                groups.setdefault(job.key, []).append(n)
            out: list[dict | None] = [None] * len(jobs)
            for key, members in groups.items():
                group = [jobs[n] for n in members]
                predictor = self.model(key, group[0].path)
                arrays = group[0].arrays if len(group) == 1 else np.concatenate([j.arrays for j in group])
                batch_id = next(self.batch_ids)
                self._set_threads(alone and len(arrays) <= self.LONE_MAX_IMAGES)
                probs = predictor.infer(predictor.batch(arrays))
                values, indices = predictor.top_k(probs, max(j.top_k for j in group))
                start = 0
                for i, (n, job) in enumerate(zip(members, group)):
                    end, k = start + len(job), job.top_k
                    out[n] = {"values": [v[:k] for v in values[start:end]],
                              "indices": [x[:k] for x in indices[start:end]], "batch": len(arrays),
                              "batch_id": batch_id, "first": i == 0, "wait_s": start_t - job.received}
                    start = end
            return out
        finally:
            with self.lock:
                self.busy -= 1

    def _set_threads(self, lone: bool) -> None:
        """Main thread: every core for a lone request, one otherwise; other workers: always one."""
        if threading.current_thread() is not self.main:
            if not getattr(self.local, "pinned", False):
                self.torch.set_num_threads(1)
                self.local.pinned = True
            return
        want = self.cores if lone else 1
        if want != self.intra:
            self.torch.set_num_threads(want)
            self.intra = want

    # ---------------------------------------------------------- requests
    def handle(self, client: _Client, message: tuple) -> None:
        rid, op = message[0], message[1]
        if op != "run":
            self.control.put((client, message))
            return
        _, _, key, path, arrays, top_k = message
        with self.lock:
            loaded = key in self.models
        if not loaded:  # first use (or a restarted process): load on the control thread
            self.control.put((client, message))
            return
        self._submit(client, _Job(client, rid, key, path, arrays, top_k))

    def _submit(self, client: _Client, job: _Job) -> None:
        with self.lock:
            client.keys.add(job.key)
        try:
            fut = self.batcher.submit(job)
        except Exception as exc:  # noqa: BLE001 - QueueFull, closed: named to the caller
            client.reply(job.rid, False, (type(exc).__name__, str(exc)))
            return
        fut.add_done_callback(lambda f: _answer(client, job.rid, f))

    def _control_loop(self) -> None:
        while True:
            client, message = self.control.get()
            rid, op = message[0], message[1]
            try:
                if op == "run":
                    _, _, key, path, arrays, top_k = message
                    self.model(key, path)
                    self._submit(client, _Job(client, rid, key, path, arrays, top_k))
                    continue
                if op == "load":
                    predictor = self.model(message[2], message[3])
                    with self.lock:
                        client.keys.add(message[2])
                    result = predictor.describe()
                elif op == "unload":
                    self.release(message[2], client)
                    result = None
                elif op == "ping":
                    result = os.getpid()
                else:
                    raise ValueError(f"unknown operation {op!r}")
                client.reply(rid, True, result)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller, named
                client.reply(rid, False, (type(exc).__name__, str(exc)))

    # ------------------------------------------------------------ loop
    def run(self, listener: socket.socket | None, path: str | None = None) -> None:
        """Forward passes on this (main) thread; connections on an I/O thread until none is left."""
        io = threading.Thread(target=self._io_loop, args=(listener, path), name="forward-io", daemon=True)
        io.start()
        self.batcher.work(primary=True)  # returns once the I/O loop closes the batcher and it drains

    def _io_loop(self, listener: socket.socket | None, path: str | None) -> None:
        try:
            self.serve(listener, path)
        finally:
            self.batcher.close(wait=False)

    def serve(self, listener: socket.socket | None, path: str | None = None) -> None:
        """Serve until no connection is left (a shared process: once the last web process leaves,
        or when nobody connected within IDLE_EXIT_S)."""
        from multiprocessing.connection import wait

        started, had_clients = time.monotonic(), False
        while True:
            with self.lock:
                conns = list(self.clients)
            if not conns:
                if listener is None:
                    return
                if had_clients or time.monotonic() - started > IDLE_EXIT_S:
                    _unlink_if_ours(path, self.path_inode)  # newcomers start a new forward process
                    for conn in _accept_pending(listener):  # ...and any that raced in get answers
                        self.add(conn)
                    listener.close()
                    listener = None
                    continue
            for r in wait(conns + ([listener] if listener is not None else []), timeout=1.0):
                if r is listener:
                    sock, _ = listener.accept()
                    self.add(Connection(sock.detach()))
                    had_clients = True
                    continue
                try:
                    message = r.recv()
                except (EOFError, OSError):
                    self.forget(r)
                    continue
                with self.lock:
                    client = self.clients.get(r)
                if client is not None:
                    self.handle(client, message)


def _answer(client: _Client, rid: int, fut: Future) -> None:
    exc = fut.exception()
    if exc is None:
        client.reply(rid, True, fut.result())
    else:
        client.reply(rid, False, (type(exc).__name__, str(exc)))


def _accept_pending(listener: socket.socket) -> list[Connection]:
    out = []
    listener.setblocking(False)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            return out
        sock.setblocking(True)
        out.append(Connection(sock.detach()))


def _unlink_if_ours(path: str | None, inode: int | None) -> None:
    try:
        if path is not None and os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m web.forward", description="Kiln's forward process")
    ap.add_argument("--threads", type=int, default=1, help="forward threads (one intra-op thread each)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--device", default="")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads a lone request may use when every other worker is idle")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a connected socket inherited from the parent (private)")
    where.add_argument("--listen", help="unix socket path to serve every web process on the host")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the web tier; we follow when it disconnects
    logging.basicConfig(level=logging.INFO, format="%(asctime)s forward[%(process)d] %(levelname)s %(message)s")
    server = _Server(args.threads, args.max_batch_size, args.max_delay_ms, args.device, args.cores)
    if args.fd is not None:
        server.add(Connection(args.fd))
        server.run(None)
        return 0
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{args.listen}.{os.getpid()}"
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, args.listen)  # atomically take over the path (a stale socket file is replaced)
    server.path_inode = os.stat(args.listen).st_ino
    try:
        server.run(listener, args.listen)
    finally:
        _unlink_if_ours(args.listen, server.path_inode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
