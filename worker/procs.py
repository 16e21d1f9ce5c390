"""Process helpers shared by the launcher (`make run`), the private Redis and the job process:
a parent-death signal, liveness checks that see zombies as dead, and group termination."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (no-op elsewhere).

    Safe as a ``subprocess.Popen(preexec_fn=...)``: only a libc call.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group a ``start_new_session`` child leads, and reap the child."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_session(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group a ``start_new_session`` child leads; SIGKILL it after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)


def end_group(pgid: int, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Send ``sig`` to a process group, then SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pgid):
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
