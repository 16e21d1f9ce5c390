"""The forward process's batcher: batching under concurrency, isolation of bad items, no delay when idle."""
from __future__ import annotations

import threading

import pytest

from web.serving.forward_batcher import Batcher, BatcherClosed


def doubler(calls: list):
    def fn(items):
        calls.append(len(items))
        for x in items:
            if x == "bad":
                raise ValueError("bad item")
        return [x * 2 for x in items]
    return fn


def test_lone_request_runs_without_waiting_for_max_delay():
    # An hour of max delay: if an idle batcher waited for company, this would time out.
    b = Batcher(doubler([]), max_batch_size=8, max_delay_ms=3_600_000)
    try:
        assert b.submit(21).result(timeout=30) == 42
        assert b.submit(1).result(timeout=30) == 2
    finally:
        b.close()


def test_concurrent_submissions_share_forward_calls():
    calls: list[int] = []
    gate = threading.Event()

    def slow(items):
        gate.wait(timeout=30)  # hold the first batch so the rest queue up behind it
        return doubler(calls)(items)

    b = Batcher(slow, max_batch_size=16, max_delay_ms=50)
    try:
        futures = [b.submit(i) for i in range(40)]
        gate.set()
        assert [f.result(timeout=30) for f in futures] == [2 * i for i in range(40)]
        assert len(calls) < 40 and max(calls) <= 16 and sum(calls) == 40
    finally:
        b.close()


def test_bad_item_fails_only_its_own_future():
    calls: list[int] = []
    gate = threading.Event()

    def held(items):
        gate.wait(timeout=30)
        return doubler(calls)(items)

    b = Batcher(held, max_batch_size=8, max_delay_ms=0)
    try:
        futures = [b.submit(x) for x in (1, 2, "bad", 4)]
        gate.set()
        assert futures[0].result(timeout=30) == 2
        assert futures[1].result(timeout=30) == 4
        with pytest.raises(ValueError, match="bad item"):
            futures[2].result(timeout=30)
        assert futures[3].result(timeout=30) == 8
    finally:
        b.close()


def test_payload_sizes_respect_max_batch_size():
    calls: list[int] = []
    gate = threading.Event()

    def fn(items):
        gate.wait(timeout=30)
        calls.append(sum(len(x) for x in items))
        return [len(x) for x in items]

    b = Batcher(fn, max_batch_size=5, max_delay_ms=0, size=len)
    try:
        futures = [b.submit([0] * n) for n in (3, 3, 2, 6)]
        gate.set()
        assert [f.result(timeout=30) for f in futures] == [3, 3, 2, 6]
        assert all(c <= 5 for c in calls[:-1]) and calls[-1] == 6  # an oversized payload runs alone
    finally:
        b.close()


def test_close_finishes_queued_work_then_rejects():
    b = Batcher(doubler([]), max_batch_size=4, max_delay_ms=0)
    fut = b.submit(3)
    b.close()
    assert fut.result(timeout=30) == 6
    with pytest.raises(BatcherClosed):
        b.submit(1)


def test_several_workers_run_batches_at_the_same_time():
    both_inside = threading.Barrier(2, timeout=10)  # passes only if two calls overlap

    def fn(xs):
        both_inside.wait()
        return xs

    b = Batcher(fn, max_batch_size=1, max_delay_ms=0, workers=2)
    try:
        first, second = b.submit(1), b.submit(2)
        assert (first.result(timeout=10), second.result(timeout=10)) == (1, 2)
    finally:
        b.close()


def test_light_traffic_stays_on_the_primary_worker():
    names: list[str] = []

    def fn(xs):
        names.append(threading.current_thread().name)
        return xs

    b = Batcher(fn, max_delay_ms=0, workers=3, name="t")
    try:
        for i in range(30):  # one request at a time, like a lone client
            assert b.submit(i).result(timeout=10) == i
    finally:
        b.close()
    assert names == ["kiln-t-0"] * 30


def test_an_external_primary_runs_on_the_owners_thread():
    seen: list[str] = []
    b = Batcher(lambda xs: seen.append(threading.current_thread().name) or xs, max_delay_ms=0, workers=1,
                external_primary=True)
    owner = threading.Thread(target=b.work, name="owner")
    owner.start()
    try:
        assert b.submit(7).result(timeout=10) == 7
    finally:
        b.close()
        owner.join(timeout=10)
    assert seen == ["owner"] and not owner.is_alive()
