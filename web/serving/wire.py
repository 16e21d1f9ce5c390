"""Both processes: the forward protocol (a JSON header and the raw bytes of one uint8 array per frame, never
pickles) and the private unix socket where web processes and the forward process meet.

The socket lives in a directory only this user can enter, is created with mode 0600, and each side checks
the other's uid (SO_PEERCRED); a peer can at worst send a bad frame, which closes its connection.
"""
from __future__ import annotations

import json
import math
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"KFW1"
HELLO = "kiln-forward/1"         # the first frame on a shared socket: {"hello": HELLO, "pid": ...}
PREFIX = struct.Struct("!4sIQ")  # magic, header bytes, payload bytes
MAX_HEADER = 64 << 20            # a model card with its config and metrics is a few KiB
MAX_PAYLOAD = 4 << 30            # inputs [N,S,S,C] of one request
DTYPES = {"uint8": np.uint8}     # the forward protocol carries uint8 images only
_DTYPE_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
CHUNK = 1 << 20                  # most bytes one read asks for
BUFFER = 1 << 16                 # what a Reader reads at once for small frames (several answers fit)


class ProtocolError(ConnectionError):
    """A frame that breaks the protocol: the connection it came on is closed."""


def _parts(header: dict, array: np.ndarray | None) -> tuple[bytes, memoryview | bytes]:
    """(prefix + JSON header, payload) of one frame."""
    payload = b""
    if array is not None:
        array = np.ascontiguousarray(array)
        name = _DTYPE_NAMES.get(array.dtype)  # a dict lookup: dtype.name is slow for a per-request path
        if name is None:
            raise TypeError(f"the forward protocol carries {', '.join(DTYPES)} arrays, not {array.dtype}")
        header = {**header, "array": {"dtype": name, "shape": list(array.shape)}}
        payload = array.reshape(-1).data
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise ValueError(f"message too large for the forward protocol ({len(text)} + {len(payload)} bytes)")
    return PREFIX.pack(MAGIC, len(text), len(payload)) + text, payload


def encode(header: dict, array: np.ndarray | None = None) -> bytes:
    """One frame as bytes: ``header`` as JSON and ``array`` (uint8) as raw bytes."""
    head, payload = _parts(header, array)
    return head + payload if payload else head


def send(sock: socket.socket, header: dict, array: np.ndarray | None = None) -> None:
    """Write one frame: one system call, or two without copying a large payload. Not thread-safe: lock around it."""
    head, payload = _parts(header, array)
    if len(payload) > BUFFER:
        sock.sendall(head)
        sock.sendall(payload)
    else:
        sock.sendall(head + payload if payload else head)


class Reader:
    """Frames from one socket, read in large chunks: several frames that arrived together cost one read."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf, self.pos = sock, bytearray(), 0

    def buffered(self) -> bool:
        """Whether a whole frame is already buffered (a selector would not say the socket is readable)."""
        have = len(self.buf) - self.pos
        if have < PREFIX.size:
            return False
        _, header_len, payload_len = PREFIX.unpack_from(self.buf, self.pos)
        return have >= PREFIX.size + header_len + payload_len

    def recv(self) -> tuple[dict, np.ndarray | None]:
        """The next frame -> (header, array or None); EOFError when the peer left, ProtocolError on a bad frame."""
        return _parse(self._take)

    def _take(self, n: int) -> bytearray:
        have = len(self.buf) - self.pos
        if have >= n:
            out = self.buf[self.pos:self.pos + n]
            self.pos += n
            return out
        out = bytearray(n)
        out[:have] = memoryview(self.buf)[self.pos:]
        self.buf, self.pos = bytearray(), 0
        view, got = memoryview(out), have
        while got < n:
            if n - got >= BUFFER:  # a large payload goes straight into its own buffer
                k = self.sock.recv_into(view[got:], min(n - got, CHUNK))
            else:  # a small remainder reads whatever else has arrived too
                self.buf = bytearray(BUFFER)
                k = self.sock.recv_into(self.buf, BUFFER)
                del self.buf[k:]
                use = min(k, n - got)
                view[got:got + use] = memoryview(self.buf)[:use]
                self.pos, k = use, use
            if k == 0:
                raise EOFError("the peer closed the connection")
            got += k
        return out


def recv(sock: socket.socket) -> tuple[dict, np.ndarray | None]:
    """Read one frame -> (header, array or None); EOFError when the peer left, ProtocolError on a bad frame."""
    return _parse(lambda n: _read(sock, n))


def _parse(take) -> tuple[dict, np.ndarray | None]:
    magic, header_len, payload_len = PREFIX.unpack(take(PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError("not a forward-protocol frame")
    if header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large ({header_len} + {payload_len} bytes)")
    try:
        header = json.loads(take(header_len))
    except (ValueError, RecursionError):
        raise ProtocolError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    spec = header.pop("array", None)
    if spec is None:
        if payload_len:
            raise ProtocolError("payload without an array description")
        return header, None
    dtype, shape = _array_spec(spec)
    if math.prod(shape) * np.dtype(dtype).itemsize != payload_len:
        raise ProtocolError(f"array {shape} does not match its {payload_len} payload bytes")
    # a bytearray, so the array is writable (torch.from_numpy wants that)
    return header, np.frombuffer(take(payload_len), dtype=dtype).reshape(shape)


def _array_spec(spec: Any) -> tuple[type, list[int]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        raise ProtocolError(f"array dtype must be one of {', '.join(DTYPES)}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(type(n) is int and 0 <= n <= MAX_PAYLOAD for n in shape)):
        raise ProtocolError("array shape must be a short list of sizes")
    return DTYPES[spec["dtype"]], shape


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, CHUNK))
        if k == 0:
            raise EOFError("the peer closed the connection")
        got += k
    return buf


# ------------------------------------------------------------------- where they meet

def peer_pid_uid(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of a unix socket, as the kernel says (None where it does not)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = struct.Struct("3i")  # struct ucred: pid, uid, gid
    pid, uid, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    return pid, uid


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix socket (None where the OS does not say)."""
    creds = peer_pid_uid(sock)
    return None if creds is None else creds[1]


def greet(sock: socket.socket) -> None:
    """The forward process's first frame on a new shared-socket connection."""
    send(sock, {"hello": HELLO, "pid": os.getpid()})


def check_peer(sock: socket.socket) -> None:
    """PermissionError unless the peer runs as this process's user."""
    uid = peer_uid(sock)
    if uid is not None and uid != os.geteuid():
        raise PermissionError(f"the forward socket's peer runs as uid {uid}, not {os.geteuid()}")


def private_dir(path: str | os.PathLike, *, ours: bool = True, create: bool = True) -> Path:
    """``path`` as a directory only this user can enter: created with mode 0700 (``create``), else checked.

    ``ours``: Kiln made it, so wider permission bits are narrowed; otherwise (an operator's
    folder, or one recorded earlier) they are refused. A symlink or another user's directory
    is always refused (PermissionError); a missing one without ``create`` is FileNotFoundError.
    """
    path = Path(path)
    if create:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(f"{path} must be a directory owned by uid {os.geteuid()} (not a link) "
                              "to hold the forward socket")
    if st.st_mode & 0o077:
        if not ours:
            raise PermissionError(f"{path} holds the forward socket: give it mode 0700 "
                                  f"(it has {stat.S_IMODE(st.st_mode):04o})")
        os.chmod(path, 0o700)
    return path


def bind_private(path: str) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 (replacing a stale one atomically)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    old = os.umask(0o177)  # the socket file is born 0600: no moment when others could connect
    try:
        listener.bind(tmp)
    finally:
        os.umask(old)
    os.chmod(tmp, 0o600)
    listener.listen(64)
    os.replace(tmp, path)
    return listener
