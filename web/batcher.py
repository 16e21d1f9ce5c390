"""Dynamic batching, and the web process's cache of served model versions.

``Batcher`` gathers payloads submitted from many threads into calls of ``fn(list)``
on its worker threads; the forward process (web/forward.py) runs one for all its
models. A worker that is free takes everything queued, so a lone request runs at once and,
under load, requests that arrive while batches run form the next batch. It waits
(at most ``max_delay_ms``) only when more is surely coming: requests that announced
themselves with ``incoming()``, or fewer inputs than the recent batches held.

``ModelServer`` maps model references (name, name:version, name@alias) to versions
loaded in the forward process, follows alias moves without failing a request, and
evicts versions nobody asked for lately.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

RECENT_BATCHES = 8  # a batch waits for as many inputs as the largest of the last few held


class BatcherClosed(RuntimeError):
    """The batcher was closed (its model version was replaced or the process is stopping)."""


class QueueFull(RuntimeError):
    """Too many requests are waiting; the caller should answer 503 and let the client retry."""


class _Slot:
    """A request announced with ``incoming()``; ``submit`` enqueues its payload."""

    def __init__(self, batcher: "Batcher"):
        self._batcher, self.used = batcher, False

    def submit(self, payload: Any) -> Future:
        self.used = True
        return self._batcher.submit(payload, _announced=True)


class Batcher:
    """Gathers payloads from many threads into calls of ``fn(list) -> list`` on one thread."""

    def __init__(self, fn: Callable[[list], Sequence], *, max_batch_size: int = 32,
                 max_delay_ms: float = 5.0, size: Callable[[Any], int] = lambda p: 1,
                 max_queue: int = 1024, name: str = "batcher", workers: int = 1,
                 external_primary: bool = False,
                 on_batch: Callable[[int, float], None] | None = None):
        self.fn, self.size = fn, size
        self.on_batch = on_batch  # (images in the batch, oldest item's queue wait in s)
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_ms)) / 1000.0
        self.max_queue = max_queue
        self.name = name
        self.calls = 0  # forward calls made (tests and metrics read it)
        self._queue: list[tuple[Any, Future]] = []
        self._arriving = 0
        self._recent: deque[int] = deque(maxlen=RECENT_BATCHES)  # sizes of the last batches
        self._closed = False
        self._cond = threading.Condition()
        # Each worker takes the next batch when it is free: with several, one batch forms
        # while others run (fn must allow concurrent calls). The primary worker always gets
        # work first; the others only take batches while it is busy, so light traffic runs
        # on the primary alone. external_primary: the owner calls ``work()`` on a thread of
        # its choosing (a process's main thread) and every thread started here is secondary.
        self._primary_busy = False  # the primary worker is running a batch
        self._threads = [threading.Thread(target=self.work, args=(n == 0 and not external_primary,),
                                          name=f"kiln-{name}-{n}", daemon=True)
                         for n in range(max(0 if external_primary else 1, int(workers)))]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------ producers
    @contextmanager
    def incoming(self) -> Iterator[_Slot]:
        """Announce a request that is still decoding, so a forming batch may wait for it."""
        slot = _Slot(self)
        with self._cond:
            self._arriving += 1
        try:
            yield slot
        finally:
            if not slot.used:
                with self._cond:
                    self._arriving -= 1
                    self._cond.notify_all()

    def submit(self, payload: Any, *, _announced: bool = False) -> Future:
        """Queue one payload; the returned future resolves to its result (or its own exception)."""
        fut: Future = Future()
        fut.kiln_enqueued = time.monotonic()  # read by _run for the queue-wait metric
        with self._cond:
            if _announced:
                self._arriving -= 1
            if self._closed:
                raise BatcherClosed(f"{self.name} is closed")
            if len(self._queue) >= self.max_queue:
                self._cond.notify_all()
                raise QueueFull(f"{len(self._queue)} requests already waiting for {self.name}")
            self._queue.append((payload, fut))
            self._cond.notify_all()
        return fut

    def close(self, wait: bool = True) -> None:
        """Stop after the queued work is done (in-flight requests still get their answers)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(timeout=60)

    @property
    def closed(self) -> bool:
        return self._closed

    # --------------------------------------------------------------- worker
    def _take(self, batch: list, count: int) -> int:
        """Move queued payloads into ``batch`` while they fit; return the new image count."""
        while self._queue:
            n = self.size(self._queue[0][0])
            if batch and count + n > self.max_batch_size:
                break
            batch.append(self._queue.pop(0))
            count += n
        return count

    def _next_batch(self, primary: bool) -> list | None:
        with self._cond:
            # Secondaries wait while the primary is free: light traffic stays on the primary.
            while not self._closed and (not self._queue or (not primary and not self._primary_busy)):
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            batch: list = []
            count = self._take(batch, 0)
            # Wait (at most max_delay) only when more is coming: requests that announced
            # themselves, or as many as recent batches held (closed-loop clients come back
            # as soon as they get their answers). A lone client never waits.
            target = min(self.max_batch_size, max(self._recent, default=1))
            deadline = time.monotonic() + self.max_delay_s
            while (count < self.max_batch_size and (self._arriving > 0 or count < target)
                   and not self._closed):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                count = self._take(batch, count)
                if self._queue:  # the next item does not fit: the batch is as full as it gets
                    break
            self._recent.append(count)
            if primary:
                self._primary_busy = True
                self._cond.notify_all()  # secondaries may now take what is still queued
            return batch

    def work(self, primary: bool = True) -> None:
        """Run batches on the calling thread until the batcher is closed and drained."""
        while True:
            batch = self._next_batch(primary)
            if batch is None:
                return
            outcomes = self._run([(p, f) for p, f in batch if f.set_running_or_notify_cancel()])
            if primary:  # free again before anyone hears back, so their next request finds it free
                with self._cond:
                    self._primary_busy = False
            for fut, ok, value in outcomes:
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _run(self, batch: list) -> list[tuple[Future, bool, Any]]:
        """(future, ok, result or exception) per item; a failing batch is retried one by one."""
        if not batch:
            return []
        self.calls += 1
        if self.on_batch is not None:
            waited = time.monotonic() - min(f.kiln_enqueued for _, f in batch)
            self.on_batch(sum(self.size(p) for p, _ in batch), waited)
        try:
            results = self.fn([p for p, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} inputs")
        except Exception as exc:  # noqa: BLE001 - isolate the bad payload below
            if len(batch) == 1:
                return [(batch[0][1], False, exc)]
            log.warning("%s: batch of %d failed (%s); retrying one by one", self.name, len(batch), exc)
            return [out for item in batch for out in self._run([item])]
        return [(fut, True, result) for (_, fut), result in zip(batch, results)]


# ---------------------------------------------------------------- model cache

class Served:
    """One loaded model version, as the web process sees it (its RemoteModel)."""

    def __init__(self, name: str, version: int, predictor: "RemoteModel"):
        self.name, self.version, self.predictor = name, version, predictor


class _Ref:
    def __init__(self, key: tuple[str, int], checked: float, pinned: bool):
        self.key, self.checked, self.pinned = key, checked, pinned
        self.loading: tuple[str, int] | None = None


class ModelServer:
    """Per-process cache: model ref -> loaded version, with alias refresh and no-downtime swaps.

    ``resolve(ref) -> {name, version, path, card}`` comes from the registry. A ref
    with an explicit version never changes; "name" and "name@alias" are re-resolved
    at most every ``refresh_s``. When one moves, the new version loads in the
    background while the old one keeps answering; then the ref switches over.
    """

    def __init__(self, resolve: Callable[[str], dict], *, max_batch_size: int = 32,
                 max_delay_ms: float = 5.0, refresh_s: float = 2.0, torch_threads: int = 1,
                 max_loaded: int = 4, device: str | None = None, forward_address: str | None = None):
        self._resolve = resolve
        self.max_batch_size, self.max_delay_ms = max_batch_size, max_delay_ms
        self.refresh_s, self.max_loaded = refresh_s, max_loaded
        self.torch_threads, self.device = torch_threads, device
        self.forward_address = forward_address  # the shared forward process; None: a private one
        self._refs: dict[str, _Ref] = {}
        self._models: dict[tuple[str, int], Served] = {}  # insertion order = LRU order
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], threading.Lock] = {}
        self.forward = None  # the ForwardProcess, started with the first model

    def get(self, ref: str) -> Served:
        """The served model for ``ref`` (loads it on first use); registry errors propagate."""
        now = time.monotonic()
        with self._lock:
            entry = self._refs.get(ref)
            fresh = entry is not None and (entry.pinned or now - entry.checked < self.refresh_s)
            if entry is not None and not fresh:
                entry.checked = now  # one thread re-resolves; the others keep the current version
            current = self._models.get(entry.key) if entry else None
        if fresh and current is not None:
            return self._touch(current)
        try:
            info = self._resolve(ref)
        except Exception as exc:
            if current is None or getattr(exc, "status", 500) == 404:
                raise
            log.warning("re-resolving %s failed (%s); still serving version %s", ref, exc, current.version)
            return current
        key = (info["name"], int(info["version"]))
        if current is not None and key != entry.key:
            self._swap_in_background(ref, entry, key, info)
            return current
        served = self._load(key, info)
        with self._lock:
            self._refs[ref] = _Ref(key, now, pinned=":" in ref)
        return served

    def _touch(self, served: Served) -> Served:
        with self._lock:
            key = (served.name, served.version)
            if key in self._models:
                self._models[key] = self._models.pop(key)
        return served

    def _swap_in_background(self, ref: str, entry: _Ref, key: tuple[str, int], info: dict) -> None:
        with self._lock:
            if entry.loading == key:
                return
            entry.loading = key

        def work():
            try:
                self._load(key, info)
                with self._lock:
                    entry.key = key
                log.info("%s now serves %s version %s", ref, key[0], key[1])
            except Exception:  # noqa: BLE001 - keep serving the old version, retry on next refresh
                log.exception("loading %s version %s for %s failed", key[0], key[1], ref)
            finally:
                with self._lock:
                    entry.loading = None

        threading.Thread(target=work, name=f"kiln-load-{key[0]}-{key[1]}", daemon=True).start()

    def _load(self, key: tuple[str, int], info: dict) -> Served:
        with self._lock:
            if key in self._models:
                return self._models[key]
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:  # one load per version; requests for other models are not blocked
            with self._lock:
                if key in self._models:
                    return self._models[key]
            served = Served(key[0], key[1], self._make_predictor(key, info))
            with self._lock:
                self._models[key] = served
                evicted = self._evict()
            for old in evicted:  # the forward process drops it once no web process uses it
                threading.Thread(target=self.forward.unload, args=((old.name, old.version),),
                                 name="kiln-unload", daemon=True).start()
            log.info("loaded model %s version %s", key[0], key[1])
            return served

    def _evict(self) -> list[Served]:
        in_use = {r.key for r in self._refs.values()} | {r.loading for r in self._refs.values()}
        out = []
        for k in list(self._models):
            if len(self._models) <= self.max_loaded:
                break
            if k not in in_use:
                out.append(self._models.pop(k))
        return out

    def _make_predictor(self, key: tuple[str, int], info: dict) -> "RemoteModel":
        from web.forward import ForwardClient

        with self._lock:
            if self.forward is None:
                self.forward = ForwardClient(threads=self.torch_threads, max_batch_size=self.max_batch_size,
                                             max_delay_ms=self.max_delay_ms, device=self.device,
                                             address=self.forward_address)
            forward = self.forward
        return RemoteModel(key, info["path"], forward.load(key, info["path"]), forward)

    def close(self) -> None:
        with self._lock:
            self._models = {}
            self._refs.clear()
            forward, self.forward = self.forward, None
        if forward is not None:
            forward.close()


class RemoteModel:
    """The web side of a model version loaded in the forward process: classes and input geometry."""

    def __init__(self, key: tuple[str, int], path: str, description: dict, forward: Any):
        self.key, self.path, self.forward = key, str(path), forward
        self.classes = [str(c) for c in description["classes"]]
        self.image_size, self.in_channels = int(description["image_size"]), int(description["in_channels"])

    def prepare(self, x: Any, index: int = 0):
        """One decoded input -> uint8 [S,S,C] through this model's eval transform (ValueError names it)."""
        from ml import images

        return images.prepare(x, index, self.image_size, self.in_channels)

    def label_rows(self, values, indices) -> list[dict]:
        from ml.images import label_rows

        return label_rows(self.classes, values, indices)

    def submit(self, arrays, top_k: int):
        """Future of this version's top-k rows for uint8 inputs [N,S,S,C] (batched in the forward process)."""
        return self.forward.run(self.key, self.path, arrays, top_k)
