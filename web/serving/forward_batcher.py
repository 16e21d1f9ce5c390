"""Dynamic batching for the forward process: ``Batcher`` gathers payloads from many threads into batches.

Generic (no torch, no sockets); ``web/serving/forward_process.py`` runs one for all its models.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

RECENT_BATCHES = 8  # a batch waits for as many inputs as the largest of the last few held


class BatcherClosed(RuntimeError):
    """The batcher was closed (the process is stopping)."""


class QueueFull(RuntimeError):
    """Too many requests are waiting; the caller should answer 503 and let the client retry."""


class Batcher:
    """Gathers payloads submitted from many threads into calls of ``fn(list) -> list`` on its workers.

    A worker that is free takes everything queued, so a lone request runs at once and,
    under load, requests that arrive while batches run form the next batch. With
    ``max_delay_ms`` above 0 a forming batch also waits (at most that long) while it holds
    fewer inputs than the recent batches did: closed-loop clients come back as soon as they
    get their answers. By default it does not wait: under load requests queue while the
    workers run and batches fill on their own, and a wait only idles the cores.
    """

    def __init__(self, fn: Callable[[list], Sequence], *, max_batch_size: int = 32,
                 max_delay_ms: float = 0.0, size: Callable[[Any], int] = lambda p: 1,
                 max_queue: int = 1024, name: str = "batcher", workers: int = 1,
                 external_primary: bool = False):
        self.fn, self.size = fn, size
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_ms)) / 1000.0
        self.max_queue = max_queue
        self.name = name
        self._queue: list[tuple[Any, Future]] = []
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
    def submit(self, payload: Any) -> Future:
        """Queue one payload; the returned future resolves to its result (or its own exception)."""
        fut: Future = Future()
        with self._cond:
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

    # --------------------------------------------------------------- worker
    def _take(self, batch: list, count: int) -> int:
        """Move queued payloads into ``batch`` while they fit; return the new input count."""
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
            # Wait (at most max_delay) only for as many inputs as recent batches held. A lone
            # client never waits.
            target = min(self.max_batch_size, max(self._recent, default=1))
            deadline = time.monotonic() + self.max_delay_s
            while count < target and not self._closed:
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
