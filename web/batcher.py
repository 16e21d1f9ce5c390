"""Dynamic batching: concurrent /predict requests in one process share a forward pass.

One background thread per (process, model version) owns the model and runs
``fn(payloads) -> results``. It never waits when it is idle and nothing else is
coming: a lone request runs at once. It waits (at most ``max_delay_ms``) only while
other requests have announced themselves (``incoming()``: they are decoding their
images in a request thread) and the batch is not yet full. While a batch runs, new
requests queue up and form the next batch, so under load batches fill by themselves.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)


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
                 max_queue: int = 1024, name: str = "batcher",
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
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"kiln-{name}", daemon=True)
        self._thread.start()

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
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

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

    def _next_batch(self) -> list | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            batch: list = []
            count = self._take(batch, 0)
            # Wait only for requests that are actually on their way, never on an idle queue.
            deadline = time.monotonic() + self.max_delay_s
            while count < self.max_batch_size and self._arriving > 0 and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                count = self._take(batch, count)
                if self._queue:  # the next item does not fit: the batch is as full as it gets
                    break
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [(p, f) for p, f in batch if f.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _run(self, batch: list) -> None:
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
                batch[0][1].set_exception(exc)
                return
            log.warning("%s: batch of %d failed (%s); retrying one by one", self.name, len(batch), exc)
            for item in batch:
                self._run([item])
            return
        for (_, fut), result in zip(batch, results):
            fut.set_result(result)


def _observe_batch(size: int, wait_s: float) -> None:
    from web.metrics import observe_batch

    observe_batch(size, wait_s)


# ---------------------------------------------------------------- model cache

class Served:
    """One loaded model version: its Predictor and the batcher thread that owns it."""

    def __init__(self, name: str, version: int, predictor: Any, batcher: Batcher):
        self.name, self.version, self.predictor, self.batcher = name, version, predictor, batcher


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
                 max_loaded: int = 4, device: str | None = None):
        self._resolve = resolve
        self.max_batch_size, self.max_delay_ms = max_batch_size, max_delay_ms
        self.refresh_s, self.max_loaded = refresh_s, max_loaded
        self.torch_threads, self.device = torch_threads, device
        self._refs: dict[str, _Ref] = {}
        self._models: dict[tuple[str, int], Served] = {}  # insertion order = LRU order
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], threading.Lock] = {}
        self._torch_ready = False

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
            predictor = self._make_predictor(info)
            batcher = Batcher(_forward(predictor), max_batch_size=self.max_batch_size,
                              max_delay_ms=self.max_delay_ms, size=lambda t: int(t.shape[0]),
                              on_batch=_observe_batch,
                              name=f"{key[0]}:{key[1]}")
            served = Served(key[0], key[1], predictor, batcher)
            with self._lock:
                self._models[key] = served
                evicted = self._evict()
            for old in evicted:
                old.batcher.close(wait=False)  # finishes its queued work, then the thread ends
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

    def _make_predictor(self, info: dict) -> Any:
        import torch

        from ml.inference import Predictor

        if not self._torch_ready:
            # One deliberate thread budget per process: only the batcher threads run forwards.
            torch.set_num_threads(max(1, int(self.torch_threads)))
            self._torch_ready = True
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return Predictor.from_checkpoint(info["path"], device=device)

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
            self._refs.clear()
        for served in models:
            served.batcher.close()


def _forward(predictor: Any) -> Callable[[list], list]:
    """Batch function for a Predictor: payloads are Tensor[n,C,H,W]; results are Tensor[n,K]."""
    def run(payloads: list) -> list:
        import torch

        probs = predictor.infer(torch.cat(payloads) if len(payloads) > 1 else payloads[0])
        return list(torch.split(probs, [int(p.shape[0]) for p in payloads]))
    return run
