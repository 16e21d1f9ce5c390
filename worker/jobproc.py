"""The job process: each job runs in a forked, non-daemon child of the worker's pool process.

A Celery prefork child is a daemon, and daemons may not start processes, so a job run
there could use neither DataLoader workers nor one process per GPU. The pool process
forks the job process instead: warm (torch already imported), in a process group of its
own, killed with its parent (a parent-death signal). The pool process keeps the lease and
ends the whole tree when the lease is lost, a cancel is not honoured in time, or the task's
time limit strikes. The job process sends its outcome back as one JSON line on a pipe.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

from worker.procs import die_with_parent

log = logging.getLogger("kiln.worker")


@dataclass
class Outcome:
    """How a job process ended; exactly one of status, error, transient, died is set."""
    status: str | None = None     # the runner's answer: completed | early_stopped | stopped
    step: int = 0
    error: str | None = None      # a deterministic failure, worded for the user
    transient: str | None = None  # an infrastructure error: the job goes back to the queue
    died: str | None = None       # the process ended without an answer (signal, exit code)
    killed: str | None = None     # the pool process ended it (and why)


def classify(exc: BaseException, transient: tuple[type, ...], time_limit_s: int) -> Outcome:
    """Turn an exception raised by a runner into an Outcome (and log what the user cannot act on)."""
    if isinstance(exc, transient):
        return Outcome(transient=f"{type(exc).__name__}: {exc}")
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
        return Outcome(error=f"the job exceeded its time limit ({time_limit_s} s)")
    if isinstance(exc, ValueError):
        return Outcome(error=str(exc))
    log.error("job failed", exc_info=exc)
    return Outcome(error=f"{type(exc).__name__}: {exc}")


def run_inline(body: Callable[[], Outcome]) -> Outcome:
    """Run the job body in this process (tests of the executor's bookkeeping)."""
    return body()


def run_forked(body: Callable[[], Outcome], *, watch: Callable[[], str | None],
               on_started: Callable[[], None] = lambda: None, poll_s: float = 0.2,
               term_grace_s: float = 10.0, env: dict[str, str] | None = None) -> Outcome:
    """Fork a job process that runs ``body`` and wait for it.

    ``env`` is set in the job process before ``body`` runs (the GPUs reserved for the job:
    CUDA_VISIBLE_DEVICES; the pool process never initialises CUDA, so the job's choice holds).
    ``on_started()`` runs here right after the fork (start threads there, not before it).
    ``watch()`` runs here every ``poll_s``; a non-None answer (the reason) ends the job's
    whole process group: SIGTERM, then SIGKILL after ``term_grace_s``.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the job process: never returns into the caller's code
        os.close(read_fd)
        code, outcome = 1, None
        try:
            _become_job_process()
            os.environ.update(env or {})
            outcome = body()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - the parent records it as a lost attempt
            traceback.print_exc()
            outcome = Outcome(died=f"the job process crashed: {type(exc).__name__}: {exc}")
        finally:
            try:
                with os.fdopen(write_fd, "w") as out:
                    out.write(json.dumps(asdict(outcome)) + "\n")
            finally:
                logging.shutdown()
                os._exit(code)
    os.close(write_fd)
    try:
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    except OSError:
        pass
    try:
        on_started()
    except BaseException:
        _killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        raise
    return _wait(pid, read_fd, watch, poll_s, term_grace_s)


def _wait(pid: int, read_fd: int, watch, poll_s: float, term_grace_s: float) -> Outcome:
    chunks: list[bytes] = []
    killed, term_at = None, None
    os.set_blocking(read_fd, False)
    try:
        while True:
            _drain(read_fd, chunks)
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                _drain(read_fd, chunks)
                break
            if killed is None:
                killed = watch()
                if killed is not None:
                    log.warning("ending the job process group %d: %s", pid, killed)
                    _killpg(pid, signal.SIGTERM)
                    term_at = time.monotonic()
            elif term_at is not None and time.monotonic() - term_at > term_grace_s:
                _killpg(pid, signal.SIGKILL)
                term_at = None
            time.sleep(poll_s)
    except BaseException:  # the task's time limit or the pool process's own shutdown: take the tree down
        _killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_fd)
    _killpg(pid, signal.SIGKILL)  # DataLoader workers or ranks the job process left behind
    raw = b"".join(chunks).decode(errors="replace").strip()
    if raw:
        outcome = Outcome(**json.loads(raw.splitlines()[-1]))
    elif os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        outcome = Outcome(died=f"the job process was killed by {signal.Signals(sig).name}"
                          + (" (out of memory?)" if sig == signal.SIGKILL and killed is None else ""))
    else:
        outcome = Outcome(died=f"the job process exited with code {os.WEXITSTATUS(wstatus)} without an outcome")
    outcome.killed = killed
    return outcome


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            return
        chunks.append(data)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _become_job_process() -> None:
    """In the fresh fork: own process group, die with the parent, default signals, non-daemon."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGKILL)  # elsewhere than Linux the parent's killpg still ends the tree
    if os.getppid() == 1:  # the parent died before the death signal was armed
        os._exit(1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # multiprocessing (and Celery's billiard) think this is still the pool's daemon child
    import multiprocessing.process as mp_process
    import multiprocessing.util as mp_util

    current = mp_process.current_process()
    current._config = {**current._config, "daemon": False}
    mp_process._children = set()
    mp_util._run_after_forkers()
    from worker import db

    db.after_fork()
