"""logs?follow=1 under pressure: a bounded number of streams per process (429 + Retry-After beyond),
slots released however a stream ends, and a client that left a quiet job noticed at once."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest

from tests.api.conftest import error_of
from tests.conftest import running_app
from web.jobs import FollowSlots, client_gone


@pytest.fixture
def follow_app(api_settings):
    s = dataclasses.replace(api_settings, log_poll_s=0.05, log_follow_streams=2, log_follow_max_s=30.0)
    with running_app(s) as app:
        yield app


def test_streams_beyond_the_limit_are_429_and_health_still_answers(follow_app, job):
    client = follow_app.test_client()
    url = f"/v1/jobs/{job['id']}/logs?follow=1"  # the job stays queued: a quiet stream
    open_ = [client.get(url, buffered=False) for _ in range(2)]
    assert all(r.status_code == 200 for r in open_)
    refused = client.get(url)
    err = error_of(refused, 429)
    assert err["code"] == "too_many_streams" and int(refused.headers["Retry-After"]) > 0
    assert client.get("/health").status_code == 200
    # a plain (non-follow) read is never refused
    assert client.get(f"/v1/jobs/{job['id']}/logs").status_code == 200
    open_[0].close()  # the server closing a response frees its slot, however it ended
    again = client.get(url, buffered=False)
    assert again.status_code == 200
    for resp in (open_[1], again):
        resp.close()
    assert follow_app.extensions["kiln.follow"].open == 0


def test_a_stream_that_fails_before_it_starts_frees_its_slot(follow_app):
    client = follow_app.test_client()
    for _ in range(5):
        assert error_of(client.get("/v1/jobs/" + "0" * 32 + "/logs?follow=1"), 404)
    assert follow_app.extensions.get("kiln.follow") is None or follow_app.extensions["kiln.follow"].open == 0


def test_a_client_that_left_a_quiet_job_is_noticed(follow_app, job):
    """The server's end of the connection reads EOF: the stream ends at the next poll, not at max_s."""
    server_end, client_end = socket.socketpair()
    try:
        client = follow_app.test_client()
        resp = client.get(f"/v1/jobs/{job['id']}/logs?follow=1", buffered=False,
                          environ_base={"werkzeug.socket": server_end})
        chunks = iter(resp.response)
        assert next(chunks) == b""  # headers go out at once
        client_end.close()
        started = time.monotonic()
        assert list(chunks) == []
        assert time.monotonic() - started < 2  # poll is 0.05 s in the test app; max_s is 30 s
        resp.close()
        assert follow_app.extensions["kiln.follow"].open == 0
    finally:
        server_end.close()


def test_client_gone_reads_the_socket_without_taking_data():
    a, b = socket.socketpair()
    try:
        assert client_gone(None) is False
        assert client_gone(a) is False  # quiet and open
        b.sendall(b"GET /next HTTP/1.1\r\n")  # a pipelined request is not a departure
        assert client_gone(a) is False and a.recv(3) == b"GET"  # peeked, not consumed
        b.close()
        a.recv(100)
        assert client_gone(a) is True
    finally:
        a.close()
    assert client_gone(a) is True  # closed on our side too


def test_slots_are_exact_under_contention():
    slots, taken, refused = FollowSlots(3), [], []
    barrier = threading.Barrier(20)

    def grab():
        barrier.wait()
        try:
            taken.append(slots.acquire())
        except Exception:  # noqa: BLE001 - TooManyRequests
            refused.append(1)

    threads = [threading.Thread(target=grab) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 3 and len(refused) == 17 and slots.open == 3
    for release in taken:
        release()
        release()  # twice: counted once
    assert slots.open == 0
