"""The forward process: batched forward passes for every web process on the host, and registry builds.

It runs as ``python -m web.serving.forward_process``, started and reached by web_client.py; why forward
passes get a process of their own, and how it batches, refuses and is watched, is in docs/serving.md.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np
import torch

from web.serving import wire
from web.serving.forward_batcher import Batcher
from web.serving.forward_models import Models, model_key, runtime_name
from web.serving.forward_sockets import IOLoop, unlink_if_ours
from worker.registry import write_artifacts

log = logging.getLogger(__name__)


class _WebProcess:
    """A connected web process: its socket, a send lock, the models it asked for."""

    def __init__(self, sock: socket.socket):
        self.sock, self.lock, self.keys = sock, threading.Lock(), set()

    def reply(self, rid: int, ok: bool, value) -> None:
        self.reply_many([(rid, ok, value)])

    def reply_many(self, answers: list[tuple[int, bool, object]]) -> None:
        """Several answers in one write: (request id, ok, value or [error kind, message])."""
        frames = []
        for rid, ok, value in answers:
            try:
                frames.append(wire.encode({"id": rid, "ok": True, "value": value} if ok else
                                          {"id": rid, "ok": False, "error": value}))
            except (TypeError, ValueError) as exc:  # not JSON (a bug here): the caller still hears of it
                frames.append(wire.encode({"id": rid, "ok": False, "error": [type(exc).__name__, str(exc)]}))
        try:
            with self.lock:
                self.sock.sendall(b"".join(frames))
        except OSError:
            pass  # the web process is gone; the I/O thread sees EOF and forgets it


class _ForwardRequest:
    """One "run" message: a web process's uint8 inputs [N,S,S,C] for one model, waiting for a forward pass."""

    __slots__ = ("sender", "rid", "key", "path", "runtime", "arrays", "top_k", "received", "queued")

    def __init__(self, sender: _WebProcess, rid: int, key: tuple, path: str, runtime: str | None, arrays, top_k: int):
        self.sender, self.rid, self.key, self.path, self.runtime = sender, rid, key, path, runtime
        self.arrays, self.top_k = arrays, top_k
        self.received = time.monotonic()
        self.queued = True  # counted in the server's queue for its model

    def __len__(self) -> int:
        return len(self.arrays)


class _Server:
    """An I/O thread reads requests into one Batcher; ``workers`` threads run the forwards.

    A free worker takes everything waiting, from every web process, and runs one forward pass per
    model through the runtime the version's card chose; each web process gets that pass's answers
    in one write. At most ``max_queue`` inputs of a model wait: beyond that a request is refused at
    once (QueueFull). Pings and health reports are answered on the I/O thread, so a web process can
    tell a busy forward process from a hung one; loads and registry builds run on a control thread.

    Worker 0 is the process's main thread and always gets work first; the others take
    batches only while it is busy. Under load every worker runs its forward passes on
    one core: several concurrent single-threaded forwards scale better on CPUs than one
    forward with several intra-op threads, and never stall on a pool thread that another
    process preempted. A small request that finds the main thread otherwise idle runs
    with all of ``cores`` as intra-op threads instead: the latency of an idle machine
    (OpenMP teams are only fast on the main thread).
    """

    LONE_MAX_IMAGES = 2

    def __init__(self, workers: int, max_batch_size: int, max_delay_ms: float, device: str, cores: int,
                 max_models: int = 4, max_queue: int = 256):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cores = max(1, cores)
        self.max_queue = max(1, max_queue)  # inputs of one model waiting for a forward pass
        torch.set_num_threads(1)
        self.intra = 1  # the main thread's intra-op threads right now
        self.busy = 0   # workers inside a forward pass
        self.batch_ids = itertools.count(1)  # numbers each forward pass (answers carry it)
        self.models = Models(device, max_models)
        self.peers: dict[socket.socket, _WebProcess] = {}
        self.queued: dict[tuple, int] = {}  # inputs waiting, per model
        self.running: dict[int, float] = {}  # forward passes in progress: batch id -> start
        self.lock = threading.Lock()        # peers, peer.keys, queued, running, busy
        self.main = threading.current_thread()  # runs worker 0
        self.local = threading.local()
        self.batcher = Batcher(self._run_batch, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                               size=len, workers=max(1, workers) - 1, external_primary=True, name="forward",
                               max_queue=1 << 30)  # the per-model bound below is what refuses requests
        self.control: queue.Queue = queue.Queue()  # model loads and builds are slow: a control thread does them
        self.io = IOLoop(self._connected, self._frame, self.forget)
        threading.Thread(target=self._control_loop, name="forward-control", daemon=True).start()

    # ----------------------------------------------------------- peers
    def _connected(self, sock: socket.socket) -> None:
        with self.lock:
            self.peers[sock] = _WebProcess(sock)

    def release(self, key: tuple, peer: _WebProcess) -> None:
        """``peer`` no longer needs ``key``; the model goes when no web process does."""
        with self.lock:
            peer.keys.discard(key)
            if any(key in p.keys for p in self.peers.values()):
                return
        self.models.pop(key)  # a request still queued for it loads it again from its path

    def forget(self, sock: socket.socket) -> None:
        with self.lock:
            peer = self.peers.pop(sock, None)
        if peer is not None:
            for key in list(peer.keys):
                self.release(key, peer)
        sock.close()

    # ---------------------------------------------------------- forwards
    def _run_batch(self, requests: list[_ForwardRequest]) -> list[None]:
        """One forward pass per model among ``requests`` (a batch is usually one model); each web
        process gets its answers in one write."""
        batch_start = time.monotonic()
        with self.lock:
            self.busy += 1
            alone = self.busy == 1
            for req in requests:
                if req.queued:
                    req.queued = False
                    self.queued[req.key] -= len(req)
            token = next(self.batch_ids)
            self.running[token] = batch_start
        try:
            groups: dict[tuple, list[_ForwardRequest]] = {}
            for req in requests:
                groups.setdefault(req.key, []).append(req)
            answers: dict[_WebProcess, list] = {}
            for key, group in groups.items():
                model = self.models.get(key) or self.models.load(key, group[0].path, group[0].runtime)  # evicted
                arrays = group[0].arrays if len(group) == 1 else np.concatenate([r.arrays for r in group])
                batch_id = next(self.batch_ids)
                threads = self._threads(alone and len(arrays) <= self.LONE_MAX_IMAGES)
                values, indices = model.top_k(arrays, max(r.top_k for r in group), threads)
                start = 0
                for i, req in enumerate(group):
                    end, k = start + len(req), req.top_k
                    answers.setdefault(req.sender, []).append((req.rid, True, {
                        "values": [v[:k] for v in values[start:end]], "indices": [x[:k] for x in indices[start:end]],
                        "batch": len(arrays), "batch_id": batch_id, "first": i == 0,
                        "wait_s": batch_start - req.received}))
                    start = end
            for peer, replies in answers.items():
                peer.reply_many(replies)
            return [None] * len(requests)
        finally:
            with self.lock:
                self.busy -= 1
                del self.running[token]

    def _threads(self, lone: bool) -> int:
        """Intra-op threads for this forward: every core for a lone request on the main thread, else one."""
        if threading.current_thread() is not self.main:
            if not getattr(self.local, "pinned", False):
                torch.set_num_threads(1)
                self.local.pinned = True
            return 1
        want = self.cores if lone else 1
        if want != self.intra:
            torch.set_num_threads(want)
            self.intra = want
        return want

    # ---------------------------------------------------------- messages
    def _frame(self, sock: socket.socket, header: dict, array) -> None:
        with self.lock:
            peer = self.peers.get(sock)
        if peer is not None:
            self.handle(peer, header, array)

    def handle(self, peer: _WebProcess, header: dict, array) -> None:
        """One request frame: {"id", "op", "args"} (+ the inputs of a "run"). Runs on the I/O thread."""
        rid, op, args = header.get("id"), header.get("op"), header.get("args")
        if not isinstance(args, list):
            peer.reply(rid, False, ["ProtocolError", "a request needs an args list"])
            return
        if op == "run":
            try:
                key, path, top_k = model_key(args[0]), str(args[1]), int(args[2])
                runtime = runtime_name(args[3] if len(args) > 3 else None)
                if array is None or array.ndim != 4:
                    raise ValueError("a run carries uint8 inputs [N,S,S,C]")
            except (IndexError, TypeError, ValueError) as exc:
                peer.reply(rid, False, ["ProtocolError", f"bad run request: {exc}"])
                return
            req = _ForwardRequest(peer, rid, key, path, runtime, array, top_k)
            with self.lock:
                waiting = self.queued.get(key, 0)
                full = waiting + len(req) > self.max_queue and waiting > 0
                if not full:
                    self.queued[key] = waiting + len(req)
                    peer.keys.add(key)
            if full:
                peer.reply(rid, False, ["QueueFull", f"{waiting} inputs already wait for model {key[0]} version "
                                                     f"{key[1]} (at most {self.max_queue})"])
            elif key in self.models:
                self._submit(req)
            else:  # first use (or a restarted process): load on the control thread
                self.control.put((peer, rid, "run", req))
        elif op in ("ping", "health"):  # answered here, however busy the workers and the control thread are
            peer.reply(rid, True, os.getpid() if op == "ping" else self.health())
        else:
            self.control.put((peer, rid, op, args))

    def health(self) -> dict:
        """What a web process's heartbeat reads: queued inputs per model, the oldest running forward pass."""
        now = time.monotonic()
        with self.lock:
            queued = [[k[0], k[1], n] for k, n in self.queued.items() if n]
            oldest = min(self.running.values(), default=now)
        return {"pid": os.getpid(), "queued": queued, "max_queue": self.max_queue, "busy_s": now - oldest,
                "models": self.models.runtimes()}

    def _submit(self, req: _ForwardRequest) -> None:
        try:
            fut = self.batcher.submit(req)
        except Exception as exc:  # noqa: BLE001 - closed: named to the caller
            self._unqueue(req)
            req.sender.reply(req.rid, False, [type(exc).__name__, str(exc)])
            return
        fut.add_done_callback(lambda f: _answer_failure(req, f))

    def _unqueue(self, req: _ForwardRequest) -> None:
        with self.lock:
            if req.queued:
                req.queued = False
                self.queued[req.key] -= len(req)

    def _control_loop(self) -> None:
        while True:
            peer, rid, op, args = self.control.get()  # args: the request's list, or a run's _ForwardRequest
            try:
                if op == "run":
                    self.models.load(args.key, args.path, args.runtime)
                    self._submit(args)
                    continue
                if op == "load":
                    key = model_key(args[0])
                    model = self.models.load(key, str(args[1]), runtime_name(args[2] if len(args) > 2 else None))
                    with self.lock:
                        peer.keys.add(key)
                    result = model.describe()
                elif op == "unload":
                    self.release(model_key(args[0]), peer)
                    result = None
                elif op == "build":
                    src, out_dir, meta = str(args[0]), str(args[1]), dict(args[2])
                    result = write_artifacts(src, out_dir, **meta)
                elif op == "models":
                    result = [list(k) for k in self.models.keys()]
                else:
                    raise ValueError(f"unknown operation {op!r}")
                peer.reply(rid, True, result)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller, named
                if op == "run":
                    self._unqueue(args)
                    rid = args.rid
                peer.reply(rid, False, [type(exc).__name__, str(exc)])

    # ------------------------------------------------------------ loop
    def run(self, listener: socket.socket | None, path: str | None = None, inode: int | None = None) -> None:
        """Forward passes on this (main) thread; connections on an I/O thread until none is left."""
        io = threading.Thread(target=self._io_loop, args=(listener, path, inode), name="forward-io", daemon=True)
        io.start()
        self.batcher.work(primary=True)  # returns once the I/O loop closes the batcher and it drains

    def _io_loop(self, listener: socket.socket | None, path: str | None, inode: int | None) -> None:
        try:
            self.io.run(listener, path, inode)
        finally:
            self.batcher.close(wait=False)


def _answer_failure(req: _ForwardRequest, fut: Future) -> None:
    """A request whose forward pass failed hears why (successful ones were answered with their batch)."""
    exc = fut.exception()
    if exc is not None:
        req.sender.reply(req.rid, False, [type(exc).__name__, str(exc)])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m web.serving.forward_process", description="Kiln's forward process")
    ap.add_argument("--workers", type=int, default=1, help="forward workers (one intra-op thread each)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=0.0)
    ap.add_argument("--max-models", type=int, default=4, help="model versions kept loaded (least recently used go)")
    ap.add_argument("--max-queue", type=int, default=256, help="inputs of one model that may wait (more: QueueFull)")
    ap.add_argument("--device", default="")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads a lone request may use when every other worker is idle")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a connected socket inherited from the parent (private)")
    where.add_argument("--listen", help="unix socket path to serve every web process on the host")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the web tier; we follow when it disconnects
    logging.basicConfig(level=logging.INFO, format="%(asctime)s forward[%(process)d] %(levelname)s %(message)s")
    listener = None if args.listen is None else wire.bind_private(args.listen)  # before any thread starts
    server = _Server(args.workers, args.max_batch_size, args.max_delay_ms, args.device, args.cores,
                     max_models=args.max_models, max_queue=args.max_queue)
    if listener is None:
        server.io.add(socket.socket(fileno=args.fd))
        server.run(None)
        return 0
    inode = os.stat(args.listen).st_ino
    try:
        server.run(listener, args.listen, inode)
    finally:
        unlink_if_ours(args.listen, inode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
