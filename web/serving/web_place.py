"""Web process: where the host's shared forward process listens (``SocketPlace``) and how to reach it.

A socket file (0600) in a directory only this user can enter, found the same way by every web
process of the host; a connection counts only once the process there has said hello.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ml.files import atomic_write
from web.serving import wire

SOCKET_NAME = "forward.sock"
MAX_SOCKET_PATH = 100     # sun_path holds 108 bytes, its NUL included
HELLO_TIMEOUT_S = 30.0    # a live forward process greets a new connection at once


class SocketPlace:
    """Where the host's shared forward process listens: a socket file (0600) in a directory only
    this user can enter, found the same way by every web process of the host.

    By default that is ``<home>/forward/forward.sock``. A home too long for a unix socket path
    gets a directory from ``tempfile.mkdtemp`` (unpredictable name, mode 0700) whose path is
    recorded in ``<home>/forward/address``; an explicit ``path`` (KILN_FORWARD_SOCKET) must sit
    in a directory of this user's with mode 0700 (created so if missing).
    """

    def __init__(self, *, home: str | os.PathLike | None = None, path: str | None = None):
        if (home is None) == (path is None):
            raise ValueError("SocketPlace takes a home or an explicit socket path")
        self.explicit = None if path is None else os.path.abspath(path)
        self.folder = Path(self.explicit).parent if self.explicit else Path(home) / "forward"

    @classmethod
    def from_settings(cls, settings) -> "SocketPlace | None":
        """The settings' place for the shared forward process; None for one private process per web process."""
        if settings.forward_socket == "private":
            return None
        if settings.forward_socket:
            return cls(path=settings.forward_socket)
        return cls(home=settings.home_path)

    def find(self) -> str | None:
        """The socket path to try now (None: none is recorded yet, or the recorded one is not safe)."""
        if self.explicit:
            return self.explicit
        path = self.folder / SOCKET_NAME
        if len(str(path)) <= MAX_SOCKET_PATH:
            return str(path)
        try:
            recorded = Path((self.folder / "address").read_text().strip())
            wire.private_dir(recorded.parent, ours=False, create=False)  # ours, 0700, not a link: else afresh
        except (OSError, ValueError):
            return None
        return str(recorded)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held by the one web process that starts the forward process; the others wait, then connect."""
        wire.private_dir(self.folder, ours=self.explicit is None)
        name = f"{SOCKET_NAME}.lock" if self.explicit is None else f"{Path(self.explicit).name}.lock"
        with open(self.folder / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def claim(self) -> str:
        """The socket path a new forward process should listen on (call with ``lock`` held)."""
        path = self.find()
        if path is not None:
            return path
        folder = wire.private_dir(tempfile.mkdtemp(prefix="kiln-fwd-"))  # mkdtemp makes it 0700
        path = str(folder / SOCKET_NAME)
        if len(path) > MAX_SOCKET_PATH:
            raise OSError(f"no short socket path: {path} is over {MAX_SOCKET_PATH} bytes; set TMPDIR or "
                          "KILN_FORWARD_SOCKET to a shorter place")
        atomic_write(self.folder / "address", path.encode(), mode=0o600)
        return path


def connect_unix(path: str) -> socket.socket:
    """A connection to the live forward process at ``path``: PermissionError if another user listens
    there, ConnectionRefusedError if the one there is exiting (no hello)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        wire.check_peer(s)
        # A killed process accepts connections into its backlog until its files close: only a
        # hello says that someone will answer.
        s.settimeout(HELLO_TIMEOUT_S)
        try:
            hello, _ = wire.recv(s)
        except EOFError:
            raise ConnectionRefusedError(f"the forward process on {path} is exiting") from None
        if hello.get("hello") != wire.HELLO:
            raise wire.ProtocolError(f"{path} is not a forward process of this version")
        s.settimeout(None)
    except OSError:
        s.close()
        raise
    return s
