"""The forward process: batched forward passes for every web process on the host, and registry builds.

The only web module that imports torch or ml.inference; it runs as ``python -m web.serving.forward_process``
and web processes reach it through web_client.py.

A web process runs many request threads that parse HTTP, decode images and write
JSON: all Python, all taking the GIL in turn. An eager PyTorch forward pass in the
same process must take the GIL back after every operator; with busy request threads
each of those waits can last the interpreter's switch interval (5 ms), and a forward
pass that takes 10 ms alone took ten times longer under load. So forward passes run
here, in a process that does nothing else.

One ``Batcher`` feeds forward workers (one intra-op thread each) that take everything
waiting whenever one of them is free, from every connected web process, one forward
pass per model: batches are as large as the host's traffic makes them, and a lone
request runs at once. Answers are each request's top-k rows. Model registration
builds its artifacts here too (``build``), so no web process ever loads torch.

By default all web processes of a host share one forward process on a unix socket
(``web_client.SocketPlace``: mode 0600 in a directory only Kiln's user can enter, peers
of another uid refused): the first web process that needs it starts it (under a file
lock), it exits when the last one disconnects, and it is started again on the next
request if it ever dies. ``forward_socket = "private"`` gives each web process its own
child on a socket pair. Messages are wire.py frames (JSON header + raw uint8 bytes), never
pickles. At most ``--max-models`` model versions stay loaded (least recently used go first).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np
import torch

from ml.inference import Predictor
from web.serving import wire
from web.serving.forward_batcher import Batcher
from worker.registry import write_artifacts

log = logging.getLogger(__name__)

IDLE_EXIT_S = 60.0  # a shared forward process nobody connected to exits after this


class _WebProcess:
    """A connected web process: its socket, a send lock, the models it asked for."""

    def __init__(self, sock: socket.socket):
        self.sock, self.lock, self.keys = sock, threading.Lock(), set()

    def reply(self, rid: int, ok: bool, value) -> None:
        message = {"id": rid, "ok": True, "value": value} if ok else {"id": rid, "ok": False, "error": value}
        try:
            with self.lock:
                try:
                    wire.send(self.sock, message)
                except (TypeError, ValueError) as exc:  # not JSON (a bug here): the caller still hears of it
                    wire.send(self.sock, {"id": rid, "ok": False, "error": [type(exc).__name__, str(exc)]})
        except OSError:
            pass  # the web process is gone; the I/O thread sees EOF and forgets it


class _ForwardRequest:
    """One "run" message: a web process's uint8 inputs [N,S,S,C] for one model, waiting for a forward pass."""

    __slots__ = ("sender", "rid", "key", "path", "arrays", "top_k", "received")

    def __init__(self, sender: _WebProcess, rid: int, key: tuple, path: str, arrays, top_k: int):
        self.sender, self.rid, self.key, self.path = sender, rid, key, path
        self.arrays, self.top_k = arrays, top_k
        self.received = time.monotonic()

    def __len__(self) -> int:
        return len(self.arrays)


class _Server:
    """An I/O thread reads requests into one Batcher; ``workers`` threads run the forwards.

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
                 max_models: int = 4):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cores = max(1, cores)
        self.max_models = max(1, max_models)
        torch.set_num_threads(1)
        self.intra = 1  # the main thread's intra-op threads right now
        self.busy = 0   # workers inside a forward pass
        self.batch_ids = itertools.count(1)  # numbers each forward pass (answers carry it)
        self.models: OrderedDict[tuple, Predictor] = OrderedDict()  # least recently used first
        self.peers: dict[socket.socket, _WebProcess] = {}
        self.lock = threading.Lock()        # models, peers, peer.keys, busy
        self.main = threading.current_thread()  # runs worker 0
        self.local = threading.local()
        self.batcher = Batcher(self._run_batch, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                               size=len, workers=max(1, workers) - 1, external_primary=True, name="forward")
        self.control: queue.Queue = queue.Queue()  # model loads and builds are slow: a control thread does them
        self.path_inode: int | None = None
        threading.Thread(target=self._control_loop, name="forward-control", daemon=True).start()

    # ----------------------------------------------------------- models
    def model(self, key: tuple, path: str) -> Predictor:
        """The Predictor for ``key``, loading it on first use (and dropping the least recently
        used beyond ``max_models``: a request for one of those loads it again from its path)."""
        with self.lock:
            predictor = self.models.get(key)
            if predictor is not None:
                self.models.move_to_end(key)
                return predictor
        predictor = Predictor.from_checkpoint(path, device=self.device)
        with self.lock:
            predictor = self.models.setdefault(key, predictor)
            self.models.move_to_end(key)
            evicted = [self.models.popitem(last=False)[0] for _ in range(len(self.models) - self.max_models)]
        log.info("loaded model %s version %s from %s", key[0], key[1], path)
        for old in evicted:  # a forward pass still running on it keeps its own reference
            log.info("unloaded model %s version %s (least recently used; --max-models %d)", old[0], old[1],
                     self.max_models)
        return predictor

    def release(self, key: tuple, peer: _WebProcess) -> None:
        """``peer`` no longer needs ``key``; the model goes when no web process does."""
        with self.lock:
            peer.keys.discard(key)
            if any(key in p.keys for p in self.peers.values()):
                return
            dropped = self.models.pop(key, None)
        if dropped is not None:  # a request still queued for it loads it again from its path
            log.info("unloaded model %s version %s", key[0], key[1])

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            self.peers[sock] = _WebProcess(sock)

    def forget(self, sock: socket.socket) -> None:
        with self.lock:
            peer = self.peers.pop(sock, None)
        if peer is not None:
            for key in list(peer.keys):
                self.release(key, peer)
        sock.close()

    # ---------------------------------------------------------- forwards
    def _run_batch(self, requests: list[_ForwardRequest]) -> list[dict]:
        """One forward pass per model among ``requests`` (a batch is usually one model)."""
        with self.lock:
            self.busy += 1
            alone = self.busy == 1
        try:
            start_t = time.monotonic()
            groups: dict[tuple, list[int]] = {}
            for n, req in enumerate(requests):
                groups.setdefault(req.key, []).append(n)
            out: list[dict | None] = [None] * len(requests)
            for key, members in groups.items():
                group = [requests[n] for n in members]
                predictor = self.model(key, group[0].path)
                arrays = group[0].arrays if len(group) == 1 else np.concatenate([r.arrays for r in group])
                batch_id = next(self.batch_ids)
                self._set_threads(alone and len(arrays) <= self.LONE_MAX_IMAGES)
                probs = predictor.infer(predictor.batch(arrays))  # [N, classes]
                values, indices = predictor.top_k(probs, max(r.top_k for r in group))
                start = 0
                for i, (n, req) in enumerate(zip(members, group)):
                    end, k = start + len(req), req.top_k
                    out[n] = {"values": [v[:k] for v in values[start:end]],
                              "indices": [x[:k] for x in indices[start:end]], "batch": len(arrays),
                              "batch_id": batch_id, "first": i == 0, "wait_s": start_t - req.received}
                    start = end
            return out
        finally:
            with self.lock:
                self.busy -= 1

    def _set_threads(self, lone: bool) -> None:
        """Main thread: every core for a lone request, one otherwise; other workers: always one."""
        if threading.current_thread() is not self.main:
            if not getattr(self.local, "pinned", False):
                torch.set_num_threads(1)
                self.local.pinned = True
            return
        want = self.cores if lone else 1
        if want != self.intra:
            torch.set_num_threads(want)
            self.intra = want

    # ---------------------------------------------------------- messages
    def handle(self, peer: _WebProcess, header: dict, array) -> None:
        """One request frame: {"id", "op", "args"} (+ the inputs of a "run")."""
        rid, op, args = header.get("id"), header.get("op"), header.get("args")
        if not isinstance(args, list):
            peer.reply(rid, False, ["ProtocolError", "a request needs an args list"])
            return
        if op == "run":
            try:
                key, path, top_k = _key(args[0]), str(args[1]), int(args[2])
                if array is None or array.ndim != 4:
                    raise ValueError("a run carries uint8 inputs [N,S,S,C]")
            except (IndexError, TypeError, ValueError) as exc:
                peer.reply(rid, False, ["ProtocolError", f"bad run request: {exc}"])
                return
            req = _ForwardRequest(peer, rid, key, path, array, top_k)
            with self.lock:
                loaded = key in self.models
            if loaded:
                self._submit(peer, req)
            else:  # first use (or a restarted process): load on the control thread
                self.control.put((peer, rid, "run", req))
            return
        self.control.put((peer, rid, op, args))

    def _submit(self, peer: _WebProcess, req: _ForwardRequest) -> None:
        with self.lock:
            peer.keys.add(req.key)
        try:
            fut = self.batcher.submit(req)
        except Exception as exc:  # noqa: BLE001 - QueueFull, closed: named to the caller
            peer.reply(req.rid, False, [type(exc).__name__, str(exc)])
            return
        fut.add_done_callback(lambda f: _answer(peer, req.rid, f))

    def _control_loop(self) -> None:
        while True:
            peer, rid, op, args = self.control.get()  # args: the request's list, or a run's _ForwardRequest
            try:
                if op == "run":
                    self.model(args.key, args.path)
                    self._submit(peer, args)
                    continue
                if op == "load":
                    key, path = _key(args[0]), str(args[1])
                    predictor = self.model(key, path)
                    with self.lock:
                        peer.keys.add(key)
                    result = predictor.describe()
                elif op == "unload":
                    self.release(_key(args[0]), peer)
                    result = None
                elif op == "build":
                    src, out_dir, meta = str(args[0]), str(args[1]), dict(args[2])
                    result = write_artifacts(src, out_dir, **meta)
                elif op == "ping":
                    result = os.getpid()
                elif op == "models":
                    with self.lock:
                        result = [list(k) for k in self.models]
                else:
                    raise ValueError(f"unknown operation {op!r}")
                peer.reply(rid, True, result)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller, named
                peer.reply(rid, False, [type(exc).__name__, str(exc)])

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
        started, had_peers = time.monotonic(), False
        while True:
            with self.lock:
                socks = list(self.peers)
            if not socks:
                if listener is None:
                    return
                if had_peers or time.monotonic() - started > IDLE_EXIT_S:
                    _unlink_if_ours(path, self.path_inode)  # newcomers start a new forward process
                    for sock in _accept_pending(listener):  # ...and any that raced in get answers
                        self.add(sock)
                    listener.close()
                    listener = None
                    continue
            for r in _ready(socks + ([listener] if listener is not None else []), timeout=1.0):
                if r is listener:
                    sock = _accept(listener)
                    if sock is not None:
                        self.add(sock)
                        had_peers = True
                    continue
                try:
                    header, array = wire.recv(r)
                except (EOFError, OSError) as exc:  # gone, or a frame that breaks the protocol
                    if not isinstance(exc, EOFError):
                        log.warning("dropping a web process connection: %s", exc)
                    self.forget(r)
                    continue
                with self.lock:
                    peer = self.peers.get(r)
                if peer is not None:
                    self.handle(peer, header, array)


def _key(value) -> tuple[str, int]:
    """A model key as the wire carries it, [name, version] -> (name, version)."""
    name, version = value
    if not isinstance(name, str) or type(version) is not int:
        raise ValueError(f"a model key is [name, version], got {value!r}")
    return name, version


def _ready(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in sel.select(timeout)]


def _accept(listener: socket.socket) -> socket.socket | None:
    """The next connection, if it comes from this user (the socket's mode says so already; this checks)."""
    try:
        sock, _ = listener.accept()
    except OSError:
        return None
    sock.setblocking(True)
    try:
        wire.check_peer(sock)
    except OSError as exc:
        log.warning("refused a connection: %s", exc)
        sock.close()
        return None
    try:
        wire.greet(sock)
    except OSError:
        sock.close()
        return None
    return sock


def _answer(peer: _WebProcess, rid: int, fut: Future) -> None:
    exc = fut.exception()
    if exc is None:
        peer.reply(rid, True, fut.result())
    else:
        peer.reply(rid, False, [type(exc).__name__, str(exc)])


def _accept_pending(listener: socket.socket) -> list[socket.socket]:
    out = []
    listener.setblocking(False)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:  # BlockingIOError: none left
            return out
        sock.setblocking(True)
        try:
            wire.check_peer(sock)
            wire.greet(sock)
        except OSError:
            sock.close()
            continue
        out.append(sock)


def _unlink_if_ours(path: str | None, inode: int | None) -> None:
    try:
        if path is not None and os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m web.serving.forward_process", description="Kiln's forward process")
    ap.add_argument("--workers", type=int, default=1, help="forward workers (one intra-op thread each)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--max-models", type=int, default=4, help="model versions kept loaded (least recently used go)")
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
                     max_models=args.max_models)
    if listener is None:
        server.add(socket.socket(fileno=args.fd))
        server.run(None)
        return 0
    server.path_inode = os.stat(args.listen).st_ino
    try:
        server.run(listener, args.listen)
    finally:
        _unlink_if_ours(args.listen, server.path_inode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
