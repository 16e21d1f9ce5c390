"""One checkpoint schema: a plain dict saved atomically, loadable with weights_only=True.

``save_checkpoint`` writes ``<name>.pt`` with ``ml.files.atomic_write`` (a crash never leaves
a half-written checkpoint) and a small JSON sidecar ``<name>.json`` so a run can be inspected
without torch. ``snapshot`` copies a state to CPU tensors that training can no longer change, and
``CheckpointWriter`` writes such snapshots on one background thread, so the training thread
only pays for the copy.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ml.files import atomic_write

FORMAT = "kiln.checkpoint/1"
KILN_VERSION = "0.1.0"
# Keys copied into the JSON sidecar (everything except tensors/state dicts).
_SIDECAR_KEYS = ("format", "epoch", "step", "batch_in_epoch", "classes", "normalization", "image_size",
                 "in_channels", "metrics", "best", "world_size", "versions", "config")


def versions() -> dict:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "kiln": KILN_VERSION}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind torch.compile / DataParallel / DDP wrappers (what we save)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` and its JSON sidecar."""
    path = Path(path)
    state = {"format": FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))
    sidecar = {k: state[k] for k in _SIDECAR_KEYS if k in state}
    sidecar["size"] = path.stat().st_size
    text = json.dumps(sidecar, indent=1, default=str).encode()
    atomic_write(path.with_suffix(".json"), text)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a Kiln checkpoint with ``torch.load(weights_only=True)`` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated / foreign pickles surface as many exception types
        raise ValueError(f"{path} is not a readable checkpoint ({exc}); was it written by Kiln?") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a Kiln checkpoint (no 'model' state)")
    return state


def snapshot(obj: Any) -> Any:
    """A deep copy of a state (dicts, lists, tuples) with every tensor cloned to CPU: what the training
    thread hands to the writer, unaffected by later optimizer steps."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return copy.deepcopy(obj)


class CheckpointWriter:
    """Writes snapshots with ``save_checkpoint`` on one background thread, in the order given.

    At most one write waits behind the one being written: a ``submit`` beyond that waits for the
    writer (never an unbounded queue of full copies of the model). A failed write is raised again on
    the calling thread by the next ``submit`` or ``flush``; ``close`` flushes and stops the thread.
    Each file is written atomically, so a crash at any point leaves the old checkpoint or the new one.
    """

    def __init__(self, name: str = "kiln-checkpoint-writer"):
        self._name = name
        self._cond = threading.Condition()
        self._pending: list[tuple[Path, dict]] | None = None   # the next write, not yet taken
        self._writing = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.wait_s = 0.0   # time the training thread spent waiting for the writer

    def submit(self, writes: list[tuple[str | Path, dict]]) -> None:
        """Queue ``[(path, snapshot), ...]`` (written in order, as one unit); returns once it is queued."""
        t0 = time.perf_counter()
        with self._cond:
            if self._closed:
                raise RuntimeError("the checkpoint writer is closed")
            while self._pending is not None and self._error is None:
                self._cond.wait()
            self._raise()
            self._pending = [(Path(p), s) for p, s in writes]
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        self.wait_s += time.perf_counter() - t0

    @property
    def failed(self) -> bool:
        """Whether a write failed and the training thread has not been told yet."""
        with self._cond:
            return self._error is not None

    def flush(self) -> None:
        """Wait until everything submitted is on disk; raise a failed write's error here."""
        with self._cond:
            while (self._pending is not None or self._writing) and self._error is None:
                self._cond.wait()
            self._raise()

    def close(self) -> None:
        """Flush, then stop the thread (also when the flush raises)."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._pending = None  # written after a failure, a later state would hide which one is on disk
            raise error

    def _loop(self) -> None:
        while True:
            with self._cond:
                # after a failure nothing more is written until the training thread has seen it
                while (self._pending is None or self._error is not None) and not self._closed:
                    self._cond.wait()
                if self._closed and (self._pending is None or self._error is not None):
                    return
                writes, self._pending, self._writing = self._pending, None, True
                self._cond.notify_all()
            try:
                for path, state in writes:
                    save_checkpoint(path, state)
                    self.writes += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
