"""Follow streams on the live web tier (gunicorn, 2 processes x 4 threads, real Redis): more streams
than the limit get 429, /health answers while they are open, and clients that leave a quiet job
give their slots back at once (the job stays queued: no worker runs here, so its log never moves)."""
from __future__ import annotations

import socket
import time

import pytest
import requests

from configs import Settings
from worker.live import TINY, LiveService

pytestmark = pytest.mark.integration
PROCESSES = 2  # LiveService runs gunicorn with --workers 2 --threads 4


@pytest.fixture(scope="module")
def web_tier(tmp_path_factory):
    service = LiveService(tmp_path_factory.mktemp("streams") / "var")
    try:
        yield service.start(worker=False)
    finally:
        service.stop()


def open_follow(service, job_id: str) -> tuple[socket.socket, int, bytes]:
    """A raw HTTP/1.1 follow request; returns once the status line and headers are in."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    sock.sendall(f"GET /v1/jobs/{job_id}/logs?follow=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, int(head.split(b" ", 2)[1]), head


def test_streams_are_bounded_health_answers_and_departed_clients_free_slots(web_tier):
    job = web_tier.submit(TINY)  # queued for good: a quiet log
    limit = PROCESSES * Settings().log_follow_streams
    opened = [open_follow(web_tier, job["id"]) for _ in range(limit + 4)]
    held = [sock for sock, status, _ in opened if status == 200]
    refused = [(sock, head) for sock, status, head in opened if status == 429]
    try:
        assert len(held) <= limit and len(refused) >= 4, [s for _, s, _ in opened]
        assert all(b"retry-after:" in head.lower() for _, head in refused)
        started = time.monotonic()
        for _ in range(5):
            assert requests.get(web_tier.url("/health"), timeout=5).status_code == 200
        assert time.monotonic() - started < 5
        assert requests.get(web_tier.url(f"/v1/jobs/{job['id']}"), timeout=5).status_code == 200
    finally:
        for sock, _ in refused:
            sock.close()
        for sock in held:
            sock.close()  # the clients leave; the job is still quiet
    # every slot comes back: new followers get 200 on both processes (stale slots would refuse them)
    deadline, fresh = time.monotonic() + 30, []
    try:
        while len(fresh) < limit and time.monotonic() < deadline:
            sock, status, _ = open_follow(web_tier, job["id"])
            if status == 200:
                fresh.append(sock)
            else:
                sock.close()
                time.sleep(0.2)
        assert len(fresh) == limit
    finally:
        for sock in fresh:
            sock.close()
