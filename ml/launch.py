"""Starting and watching the ranks of a multi-process run; runs in the process that starts them.

``launch`` starts one process per rank with ``torch.multiprocessing.start_processes`` (forked from
this warm process on CPU, spawned for CUDA), all in the caller's process group, and supervises
them: rank 0's progress goes to ``report``, ``should_stop`` becomes a flag that rank 0 sends to
every rank with the step's all-reduce (ml.distributed.Rank), and a rank that dies or fails ends
them all. ``_entry`` is each rank's first frame: it joins the group and runs the rank's function.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from ml.distributed import Rank

log = logging.getLogger("kiln.ml")
# No rank waits longer than this in one collective: past it the collective raises (gloo) or the
# NCCL watchdog aborts the rank, and the attempt ends instead of hanging.
COLLECTIVE_TIMEOUT_S = 300.0


class RankFailed(RuntimeError):
    """A rank died, or failed other than with a ValueError (a lost peer, a collective timeout, a device
    fault): the attempt is lost, and a new one resumes from checkpoints/last.pt."""


def visible_gpus() -> int:
    """CUDA devices this process may use; counted through NVML where possible, which does not
    initialise CUDA, so ranks may still be started from this process."""
    return torch.cuda.device_count()


def resolve_processes(requested: int | str, device: str, batch_size: int) -> tuple[int, str | None]:
    """training.processes (an int or "auto") on training.device -> (ranks, "cuda" | "cpu"), or
    (1, None) for one process, which resolves its device itself.

    auto is one rank per visible GPU, and 1 on CPU. ``batch_size`` is the global batch: every
    rank takes ``batch_size / ranks`` samples per micro-batch, so it must divide evenly.
    """
    if requested in (1, "1"):
        return 1, None
    gpus = visible_gpus() if device in ("auto", "cuda") else 0
    kind = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise ValueError("training.device is 'cuda' but no CUDA device is visible; use device: auto or cpu")
    n = (gpus or 1) if requested == "auto" else int(requested)
    if n < 1:
        raise ValueError(f"training.processes must be >= 1 or auto, got {requested!r}")
    if n == 1:
        return 1, None
    if device.startswith("cuda:") or device == "mps":
        raise ValueError(f"training.device {device!r} names one device; with processes > 1 use device: auto, "
                         "cuda or cpu (each rank takes a GPU of its own)")
    if kind == "cuda" and n > gpus:
        raise ValueError(f"training.processes is {n} but {gpus} GPU(s) are visible; use processes: auto or <= {gpus}")
    if batch_size % n:
        raise ValueError(f"training.batch_size {batch_size} is the global batch and must be a multiple of "
                         f"training.processes {n} (each process takes batch_size / processes)")
    return n, kind


@dataclass
class _Spec:
    """What every rank receives (picklable, for the spawn start method)."""
    world_size: int
    device_type: str
    store_path: str
    timeout_s: float
    threads: int               # intra-op threads of each rank (rank_threads)
    stop: Any                  # a multiprocessing Event: the launcher sets it, rank 0 reads it
    conns: list                # one writable Connection per rank, to the launcher
    fn: Callable
    args: tuple


def start_method(device_type: str) -> str:
    """fork for CPU ranks: they start warm, without importing torch again. spawn for CUDA ranks:
    the CUDA runtime does not survive a fork once a process has touched it."""
    return "spawn" if device_type == "cuda" else "fork"


def rank_threads(method: str, world_size: int) -> int:
    """Intra-op threads of each rank. A forked rank runs one, as torchrun's default OMP_NUM_THREADS=1
    does: a one-thread rank never enters an OpenMP parallel region, and a team the launcher ran
    before the fork does not exist in the child (a rank using it would wait forever). A spawned
    rank takes its share of the launcher's threads."""
    return 1 if method == "fork" else max(1, torch.get_num_threads() // world_size)


def launch(fn: Callable, world_size: int, args: tuple = (), *, device_type: str = "cpu",
           report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
           timeout_s: float = COLLECTIVE_TIMEOUT_S, method: str | None = None, poll_s: float = 0.1,
           grace_s: float = 5.0) -> Any:
    """Run ``fn(rank, *args)`` in ``world_size`` ranks (gloo on CPU, NCCL on CUDA); rank 0's return value.

    Raises ValueError if a rank raised one (the config or data error one process would raise),
    RankFailed if a rank died or a collective failed, RuntimeError for another error of a rank.
    Whatever happens, no rank outlives this call.
    """
    method = method or start_method(device_type)
    ctx = multiprocessing.get_context(method)
    if method != "fork":
        _stdlib_authkey()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    folder = tempfile.mkdtemp(prefix="kiln-ranks-")
    spec = _Spec(world_size, device_type, os.path.join(folder, "store"), timeout_s,
                 rank_threads(method, world_size), ctx.Event(), [w for _, w in pipes], fn, tuple(args))
    log.info("starting %d ranks (%s, %s)", world_size, "nccl" if device_type == "cuda" else "gloo", method)
    procs = None
    try:
        procs = torch_mp.start_processes(_entry, (spec,), nprocs=world_size, join=False, start_method=method)
        for _, w in pipes:
            w.close()
        inbox = _Inbox([r for r, _ in pipes], report)
        while True:
            inbox.receive(list(procs.sentinels), poll_s)
            if should_stop is not None and not spec.stop.is_set() and should_stop():
                spec.stop.set()
            try:
                if procs.join(timeout=0, grace_period=grace_s):
                    break
            except (torch_mp.ProcessRaisedException, torch_mp.ProcessExitedException):
                inbox.drain()
                raise _failure(procs, inbox.errors) from None
        inbox.drain()
        if 0 not in inbox.results:  # rank 0 ended with exit code 0 yet sent nothing (interrupted)
            raise RankFailed("rank 0 ended without a result; the attempt ends")
        return inbox.results[0]
    finally:
        for p in procs.processes if procs else ():
            if p.is_alive():
                p.kill()
            p.join()
        for name in procs.error_files if procs else ():  # torch leaves a failed rank's traceback in /tmp
            with contextlib.suppress(OSError):
                os.unlink(name)
        for r, _ in pipes:
            r.close()
        shutil.rmtree(folder, ignore_errors=True)


def _stdlib_authkey() -> None:
    """Spawning pickles this process's authkey, which only the stdlib's AuthenticationString allows
    while spawning; a process forked from a Celery (billiard) pool child carries billiard's."""
    me = multiprocessing.current_process()
    me._config["authkey"] = multiprocessing.process.AuthenticationString(bytes(me.authkey))


class _Inbox:
    """The launcher's end of the ranks' channels: progress, results and errors."""

    def __init__(self, readers: list, report):
        self.readers, self.report = readers, report
        self.results: dict[int, Any] = {}
        self.errors: list[tuple] = []

    def receive(self, sentinels: list, timeout: float) -> int:
        """Wait up to ``timeout`` for a message or a rank's end; handle every message that is in."""
        ready = [c for c in wait(self.readers + sentinels, timeout=timeout) if c in self.readers]
        for conn in ready:
            try:
                while conn.poll():
                    self._handle(*conn.recv())
            except (EOFError, OSError):       # the rank ended and its channel closed
                self.readers.remove(conn)
        return len(ready)

    def drain(self, timeout: float = 1.0) -> None:
        while self.readers and self.receive([], timeout):
            pass

    def _handle(self, kind: str, *body) -> None:
        if kind == "progress" and self.report is not None:
            self.report(body[0])
        elif kind == "result":
            self.results[body[0]] = body[1]
        elif kind == "error":
            self.errors.append(body)
            if body[1] == "lost":
                log.warning("rank %d: %s", body[0], body[2])
            elif body[1] == "error":
                log.error("rank %d failed:\n%s", body[0], body[3])


def _failure(procs, errors: list) -> Exception:
    """The exception that ends the launch, from the errors the ranks sent and their exit codes."""
    n = len(procs.processes)
    for wanted in ("value", "error"):           # the run's own errors first: a peer's failure follows from them
        for i, category, message, _ in errors:
            if category == wanted:
                return ValueError(message) if wanted == "value" else RuntimeError(f"rank {i} of {n} failed: {message}")
    killed = [(i, p.exitcode) for i, p in enumerate(procs.processes)
              if p.exitcode is not None and p.exitcode < 0 and -p.exitcode != signal.SIGTERM]
    if killed:
        i, code = killed[0]
        return RankFailed(f"rank {i} of {n} was killed by {signal.Signals(-code).name}; the attempt ends")
    if errors:
        i, _, message, _ = errors[0]
        return RankFailed(f"rank {i} of {n} failed: {message}; the attempt ends")
    codes = ", ".join(f"rank {i}: {p.exitcode}" for i, p in enumerate(procs.processes))
    return RankFailed(f"a rank ended without an answer (exit codes {codes}); the attempt ends")


def _category(exc: Exception) -> str:
    """value: the run's own error (as one process would raise it); lost: a collective or device
    failed (a peer died, a timeout, out of memory); error: anything else."""
    if isinstance(exc, ValueError):
        return "value"
    if isinstance(exc, RuntimeError) and not isinstance(exc, NotImplementedError):
        return "lost"
    return "error"


def _entry(index: int, spec: _Spec) -> None:
    """A rank's life: join the group, run ``spec.fn``, send the result or the error to the launcher."""
    conn = spec.conns[index]
    for i, other in enumerate(spec.conns):
        if i != index:
            other.close()  # the launcher sees a rank's channel close when that rank ends
    rank = Rank(index, spec.world_size, spec.device_type, spec.stop, conn)
    try:
        torch.set_num_threads(spec.threads)
        if rank.device.type == "cuda":
            torch.cuda.set_device(rank.device)
        dist.init_process_group(rank.backend, store=dist.FileStore(spec.store_path, spec.world_size),
                                rank=index, world_size=spec.world_size,
                                timeout=datetime.timedelta(seconds=spec.timeout_s),
                                device_id=rank.device if rank.device.type == "cuda" else None)
        value = spec.fn(rank, *spec.args)
        conn.send(("result", index, value if rank.main else None))
        dist.destroy_process_group()
    except Exception as exc:
        category = _category(exc)
        message = str(exc) if category == "value" else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            conn.send(("error", index, category, message, traceback.format_exc()))
        raise
    finally:
        conn.close()
