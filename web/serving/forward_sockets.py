"""Forward process: its I/O thread, which accepts web processes on the shared socket and reads their frames.

A shared forward process goes away once the last web process has left (or nobody came within IDLE_EXIT_S):
it unlinks its socket first, so a newcomer starts a new one, and still answers any that raced in.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from typing import Callable

from web.serving import wire

log = logging.getLogger(__name__)

IDLE_EXIT_S = 60.0  # a shared forward process nobody connected to exits after this


class IOLoop:
    """Reads frames from every connected web process with one selector; ``on_frame(sock, header, array)``
    handles each, ``on_connect(sock)`` / ``on_close(sock)`` hear of arrivals and departures (on_close closes)."""

    def __init__(self, on_connect: Callable, on_frame: Callable, on_close: Callable):
        self.on_connect, self.on_frame, self.on_close = on_connect, on_frame, on_close
        self.readers: dict[socket.socket, wire.Reader] = {}
        self.selector = selectors.DefaultSelector()

    def add(self, sock: socket.socket) -> None:
        self.readers[sock] = wire.Reader(sock)
        self.selector.register(sock, selectors.EVENT_READ)
        self.on_connect(sock)

    def run(self, listener: socket.socket | None, path: str | None = None, inode: int | None = None) -> None:
        """Serve until no connection is left (with a listener: once the last web process leaves, or when
        nobody connected within IDLE_EXIT_S)."""
        started, had_peers = time.monotonic(), bool(self.readers)
        if listener is not None:
            self.selector.register(listener, selectors.EVENT_READ)
        try:
            while True:
                if not self.readers:
                    if listener is None:
                        return
                    if had_peers or time.monotonic() - started > IDLE_EXIT_S:
                        unlink_if_ours(path, inode)  # newcomers start a new forward process...
                        for sock in _accept_pending(listener):  # ...and any that raced in get answers
                            self.add(sock)
                        self.selector.unregister(listener)
                        listener.close()
                        listener = None
                        continue
                # one frame per web process per round, so none waits behind another's burst
                buffered = [sock for sock, reader in self.readers.items() if reader.buffered()]
                ready = [key.fileobj for key, _ in self.selector.select(timeout=0 if buffered else 1.0)]
                for sock in buffered + [s for s in ready if s not in buffered]:
                    if sock is listener:
                        sock = _accept(listener)
                        if sock is not None:
                            self.add(sock)
                            had_peers = True
                    elif sock in self.readers:
                        self._read(sock)
        finally:
            self.selector.close()

    def _read(self, sock: socket.socket) -> None:
        """The next frame from ``sock`` (read with whatever else has arrived: see wire.Reader)."""
        try:
            header, array = self.readers[sock].recv()
        except (EOFError, OSError) as exc:  # gone, or a frame that breaks the protocol
            if not isinstance(exc, EOFError):
                log.warning("dropping a web process connection: %s", exc)
            self.selector.unregister(sock)
            del self.readers[sock]
            self.on_close(sock)
            return
        self.on_frame(sock, header, array)


def _greeted(sock: socket.socket) -> socket.socket | None:
    """``sock``, blocking, if its peer runs as this user and has been greeted; else closed and None."""
    sock.setblocking(True)
    try:
        wire.check_peer(sock)
        wire.greet(sock)
    except OSError as exc:
        if isinstance(exc, PermissionError):
            log.warning("refused a connection: %s", exc)
        sock.close()
        return None
    return sock


def _accept(listener: socket.socket) -> socket.socket | None:
    """The next connection, if it comes from this user (the socket's mode says so already; this checks)."""
    try:
        sock, _ = listener.accept()
    except OSError:
        return None
    return _greeted(sock)


def _accept_pending(listener: socket.socket) -> list[socket.socket]:
    out = []
    listener.setblocking(False)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:  # BlockingIOError: none left
            return out
        sock = _greeted(sock)
        if sock is not None:
            out.append(sock)


def unlink_if_ours(path: str | None, inode: int | None) -> None:
    """Remove the socket file at ``path`` unless another forward process has replaced it since."""
    try:
        if path is not None and os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
