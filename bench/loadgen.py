"""A light closed-loop HTTP/1.1 load generator: one thread, non-blocking sockets, N clients.

Each client sends a request, waits for the whole response, records the latency and
sends the next one (closed loop, like N users clicking as fast as answers come).
Connections are kept alive when the server allows it and reopened when it answers
``Connection: close`` (gunicorn's sync workers do). One thread and pre-encoded
requests keep the generator's own CPU use to a few tens of microseconds a request,
so on a small machine the servers, not the clients, set the numbers. Loopback only.
"""
from __future__ import annotations

import selectors
import socket
import statistics
import time
from typing import Sequence


def encode_requests(path: str, bodies: Sequence[bytes], content_type: str = "image/png") -> list[bytes]:
    """Pre-encoded POST requests, one per body."""
    out = []
    for body in bodies:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        out.append(head + body)
    return out


class _Client:
    __slots__ = ("sock", "out", "buf", "t0", "need", "close_after", "status", "n")

    def __init__(self, n: int):
        self.sock: socket.socket | None = None
        self.out = memoryview(b"")
        self.buf = bytearray()
        self.t0 = 0.0
        self.need = -1  # bytes of the whole response once its head is parsed
        self.close_after = False
        self.status = 0
        self.n = n


def _parse_head(buf: bytearray) -> tuple[int, int, bool] | None:
    """(status, total response length, server closes) once the head is complete, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length, close = 0, head[0].startswith("HTTP/1.0")
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection":
            close = value.strip().lower() == "close"
    return status, end + 4 + length, close


def run(port: int, requests: Sequence[bytes], clients: int, duration: float,
        host: str = "127.0.0.1", timeout: float = 60.0) -> dict:
    """Drive ``clients`` closed-loop clients for ``duration`` s; req/s, p50/p99 (ms), errors, n and the latencies."""
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    hard_stop = stop_at + timeout

    def connect(c: _Client) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        c.sock = s
        sel.register(s, selectors.EVENT_WRITE, c)

    def drop(c: _Client) -> None:
        if c.sock is not None:
            sel.unregister(c.sock)
            c.sock.close()
            c.sock = None

    def start(c: _Client) -> bool:
        """Begin the client's next request; False once the run is over."""
        if time.perf_counter() >= stop_at:
            drop(c)
            return False
        c.out = memoryview(requests[c.n % len(requests)])
        c.n += clients
        c.buf.clear()
        c.need = -1
        c.t0 = time.perf_counter()
        if c.sock is None:
            connect(c)
        else:
            sel.modify(c.sock, selectors.EVENT_WRITE, c)
        return True

    active = 0
    pool = [_Client(i) for i in range(clients)]
    t_begin = time.perf_counter()
    for c in pool:
        active += start(c)
    while active and time.perf_counter() < hard_stop:
        for key, events in sel.select(timeout=1.0):
            c: _Client = key.data
            try:
                if events & selectors.EVENT_WRITE:
                    sent = c.sock.send(c.out)
                    c.out = c.out[sent:]
                    if not c.out:
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                chunk = c.sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("server closed the connection mid-response")
                c.buf += chunk
                if c.need < 0:
                    parsed = _parse_head(c.buf)
                    if parsed is None:
                        continue
                    c.status, c.need, c.close_after = parsed
                if len(c.buf) < c.need:
                    continue
            except (OSError, ValueError, IndexError):
                errors += 1
                drop(c)
                active -= 0 if start(c) else 1
                continue
            if c.status == 200:
                latencies.append(time.perf_counter() - c.t0)
            else:
                errors += 1
            if c.close_after:
                drop(c)
            active -= 0 if start(c) else 1
    elapsed = time.perf_counter() - t_begin
    for c in pool:
        drop(c)
    sel.close()
    out = summary(latencies, elapsed, errors)
    out["latencies"] = latencies
    return out


def summary(latencies: Sequence[float], elapsed: float, errors: int) -> dict:
    """req/s, p50 and p99 (ms), errors and n for latencies (seconds) gathered over ``elapsed`` seconds."""
    lat = sorted(latencies)
    if not lat:
        return {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": errors, "n": 0}
    return {"rps": len(lat) / elapsed, "p50": 1000 * statistics.median(lat),
            "p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": errors, "n": len(lat)}
