"""The forward protocol and its socket: frames that cannot run code, a socket only Kiln's user can
reach at a path nobody can claim first, and a bounded model cache in the forward process."""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from web.serving import wire
from web.serving.web_client import ForwardClient, ForwardDied
from web.serving.web_place import SocketPlace, connect_unix

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ------------------------------------------------------------------- frames

def test_frames_carry_json_and_raw_uint8_arrays(pair):
    a, b = pair
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    wire.send(a, {"id": 7, "op": "run", "args": [["digits", 1], "/m.pt", 3]}, x)
    wire.send(a, {"id": 8, "ok": True, "value": {"values": [[0.5, float("nan")]]}})
    header, array = wire.recv(b)
    assert header == {"id": 7, "op": "run", "args": [["digits", 1], "/m.pt", 3]}
    assert array.dtype == np.uint8 and array.flags.writeable and np.array_equal(array, x)
    header, array = wire.recv(b)
    assert array is None and header["value"]["values"][0][0] == 0.5
    empty = np.zeros((0, 4, 4, 1), np.uint8)
    wire.send(a, {"id": 9}, empty)
    assert wire.recv(b)[1].shape == (0, 4, 4, 1)
    with pytest.raises(TypeError):
        wire.send(a, {"id": 10}, np.zeros((1, 2, 2, 1), np.float64))  # only uint8 crosses


def test_a_reader_takes_frames_that_arrived_together_and_large_payloads_whole(pair):
    a, b = pair
    small = [np.full((1, 4, 4, 1), i, np.uint8) for i in range(5)]
    big = np.arange(3 * 256 * 256 * 3, dtype=np.uint8).reshape(3, 256, 256, 3)  # past the read buffer
    a.sendall(b"".join(wire.encode({"id": i}, x) for i, x in enumerate(small)))  # one write, five frames
    sender = threading.Thread(target=lambda: (wire.send(a, {"id": 5}, big), wire.send(a, {"id": 6})))
    sender.start()
    reader = wire.Reader(b)
    for i, x in enumerate(small):
        header, array = reader.recv()
        assert header == {"id": i} and np.array_equal(array, x)
        assert reader.buffered() == (i < len(small) - 1)  # the rest came with the first read
    header, array = reader.recv()
    assert header == {"id": 5} and np.array_equal(array, big) and array.flags.writeable
    assert reader.recv() == ({"id": 6}, None)
    sender.join()
    a.close()
    with pytest.raises(EOFError):
        reader.recv()


def raw_frame(header: bytes, payload: bytes = b"", magic: bytes = wire.MAGIC, sizes=None) -> bytes:
    h, p = sizes or (len(header), len(payload))
    return wire.PREFIX.pack(magic, h, p) + header + payload


@pytest.mark.parametrize("frame, word", [
    (pickle.dumps(("ping",)), "not a forward-protocol frame"),
    (raw_frame(b"{}", magic=b"EVIL"), "not a forward-protocol frame"),
    (raw_frame(b"", sizes=(wire.MAX_HEADER + 1, 0)), "too large"),
    (raw_frame(b"", sizes=(2, wire.MAX_PAYLOAD + 1)), "too large"),
    (raw_frame(b"[1, 2]"), "JSON object"),
    (raw_frame(b"{nope"), "not JSON"),
    (raw_frame(b"[" * 100_000), "not JSON"),
    (raw_frame(b"{}", b"abc"), "without an array"),
    (raw_frame(b'{"array": {"dtype": "object", "shape": [1]}}', b"x"), "dtype"),
    (raw_frame(b'{"array": {"dtype": "uint8", "shape": [2, 2]}}', b"abc"), "does not match"),
    (raw_frame(b'{"array": {"dtype": "uint8", "shape": [-1]}}', b""), "shape"),
    (raw_frame(b'{"array": {"dtype": "uint8", "shape": "3"}}', b"abc"), "shape"),
])
def test_bad_frames_are_protocol_errors(pair, frame, word):
    a, b = pair
    a.sendall(frame)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(wire.ProtocolError, match=word):
        wire.recv(b)


def test_a_frame_cut_short_is_eof(pair):
    a, b = pair
    a.sendall(raw_frame(b'{"id": 1}')[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        wire.recv(b)


# -------------------------------------------------------------- the socket's place

def test_the_default_socket_is_0600_in_a_0700_folder_under_home(tmp_path):
    home = tmp_path / "var"
    place = SocketPlace(home=home)
    client = ForwardClient(address=place)
    try:
        client.ping()
        path = place.find()
        assert path == str(home / "forward" / "forward.sock")
        assert mode(home / "forward") == 0o700 and mode(path) == 0o600
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        client.close()


def test_a_long_home_gets_an_unpredictable_private_folder_recorded_under_home(tmp_path):
    home = tmp_path / ("h" * 120) / "var"
    homes = []
    for _ in range(2):
        place = SocketPlace(home=home)
        assert place.find() is None  # nothing recorded yet: nothing to connect to, nothing guessable
        with place.lock():
            path = place.claim()
        folder = Path(path).parent
        assert len(path) <= 100 and folder.parent == Path(tempfile.gettempdir())
        assert mode(folder) == 0o700 and os.lstat(folder).st_uid == os.geteuid()
        assert (home / "forward" / "address").read_text() == path and mode(home / "forward" / "address") == 0o600
        assert SocketPlace(home=home).find() == path  # every web process of the host finds the same one
        homes.append(path)
        folder.rmdir()  # a cleaned /tmp: the record no longer points at a safe folder
        assert SocketPlace(home=home).find() is None
    assert homes[0] != homes[1]


def test_a_recorded_folder_that_is_not_private_is_not_used(tmp_path):
    home = tmp_path / ("h" * 120)
    place = SocketPlace(home=home)
    with place.lock():
        path = place.claim()
    os.chmod(Path(path).parent, 0o777)  # someone widened it: start afresh rather than trust it
    try:
        assert place.find() is None
    finally:
        os.rmdir(Path(path).parent)


def test_an_explicit_socket_folder_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    client = ForwardClient(address=str(shared / "f.sock"))
    try:
        with pytest.raises(ForwardDied, match="mode 0700"):
            client.ping()
    finally:
        client.close()
    made = SocketPlace(path=str(tmp_path / "new" / "f.sock"))
    with made.lock():
        assert made.claim() == str(tmp_path / "new" / "f.sock")
    assert mode(tmp_path / "new") == 0o700


AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_can_neither_connect_nor_pose_as_the_forward_process(tmp_path, forward_socket):
    out = subprocess.run([sys.executable, "-c", AS_NOBODY, forward_socket], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "refused", out.stderr
    # an impostor listening where a web process looks is refused by the peer check
    folder = Path(tempfile.mkdtemp(prefix="kopen", dir="/tmp"))
    os.chmod(folder, 0o777)
    path = str(folder / "f.sock")
    impostor = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys, time\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.listen(1)\n"
        "print('ready', flush=True); c, _ = s.accept(); time.sleep(5)\n"), path], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout.readline().strip() == "ready"
        with pytest.raises(PermissionError, match="uid 65534"):
            connect_unix(path)
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_pickle_sent_to_the_forward_process_runs_nothing(tmp_path, forward_socket):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    keeper = ForwardClient(address=forward_socket)
    try:
        pid = keeper.ping()
        for blob in (pickle.dumps((1, "ping", Exploit())),
                     raw_frame(pickle.dumps(Exploit())),
                     struct.pack("!i", 40) + pickle.dumps(Exploit())):  # multiprocessing.connection's framing
            with connect_unix(forward_socket) as s:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(30)
                try:
                    assert s.recv(1) == b""  # the forward process hangs up...
                except ConnectionResetError:
                    pass  # ...with our unread bytes still in its buffer
        time.sleep(0.2)
        assert not marker.exists()
        assert keeper.ping() == pid  # and keeps serving everyone else
    finally:
        keeper.close()


# --------------------------------------------------------------- bounded model cache

def test_the_forward_process_keeps_at_most_max_models_least_recently_used_go(trained):
    a = ForwardClient(max_models=2, address=None)
    try:
        k1, k2, k3 = ("m", 1), ("m", 2), ("m", 3)
        desc = a.load(k1, str(trained))
        a.load(k2, str(trained))
        x = np.zeros((1, desc["image_size"], desc["image_size"], desc["in_channels"]), np.uint8)
        a.run(k1, str(trained), x, 1).result(timeout=60)  # k1 is now the most recently used
        assert a.loaded() == [k2, k1]
        a.load(k3, str(trained))
        assert a.loaded() == [k1, k3]
        out = a.run(k2, str(trained), x, 1).result(timeout=60)  # evicted: loaded again from its path
        assert len(out["values"]) == 1 and a.loaded() == [k3, k2]
    finally:
        a.close()


def test_the_web_model_cache_is_bounded_whatever_refs_clients_send(registered, trained, forward_socket):
    from web.serving.web_models import ModelCache

    for _ in range(3):
        registered.register_checkpoint("digits", trained)  # versions 3, 4, 5
    forward = ForwardClient(address=forward_socket, max_models=2)
    cache = ModelCache(registered.resolve_model, forward, refresh_s=60, max_loaded=2)
    try:
        for ref in ["digits:1", "digits@production", "digits:2", "digits:3", "digits:4", "digits:5", "digits"]:
            cache.get(ref)
            assert len(cache.loaded()) <= 2
        assert cache.loaded() == [("digits", 5), ("digits", 1)]  # "digits" resolves to production: version 1
        assert len(cache._refs) <= 3  # refs to evicted versions are forgotten
        assert cache.get("digits:2").version == 2  # and come back on demand
    finally:
        cache.clear()
        forward.close()


def test_a_listener_that_does_not_greet_is_not_a_live_forward_process(tmp_path):
    """A killed forward process still accepts into its backlog until its files close: no hello, no use."""
    path = str(tmp_path / "f.sock")
    listener = wire.bind_private(path)
    try:
        def hang_up():
            conn, _ = listener.accept()
            conn.close()

        t = threading.Thread(target=hang_up)
        t.start()
        try:
            with pytest.raises(ConnectionRefusedError, match="exiting"):
                connect_unix(path)
        finally:
            t.join()
        assert mode(path) == 0o600
    finally:
        listener.close()
