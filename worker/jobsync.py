"""What keeps a job's directory and storage in step, in the job process: files that changed since
the last round (size or mtime) are hashed, uploaded when storage is remote, and their sha256 is
recorded in storage; rounds run on a background thread so the training loop never waits on them.

Checkpoints are written by a background writer after the epoch's round may have started, so between
requested rounds the thread also looks at checkpoints/ every ``poll_s`` and syncs a checkpoint as soon
as its write has landed (a stat of a few files when nothing changed)."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from ml.files import TEMP_PREFIX
from worker.storage import CHUNK, INDEX

log = logging.getLogger("kiln.worker")
POLL_S = 1.0  # between requested rounds, how often checkpoints/ is looked at
CHECKPOINTS = "checkpoints/"


class Fenced(Exception):
    """This attempt no longer holds the job's lease: its writes are refused."""


class DirSync:
    """One job directory mirrored under ``prefix`` of ``storage`` (uploaded when remote)."""

    def __init__(self, storage, local_dir: Path, prefix: str, fence=None, poll_s: float = POLL_S):
        """``fence()`` is True while this attempt holds the job's lease; each round's uploads and
        its record are refused (Fenced) unless it says so just before them."""
        self.storage, self.local_dir, self.prefix, self.fence = storage, Path(local_dir), prefix, fence
        self.poll_s = poll_s
        self.fenced_out = False
        self.remote = storage.local_path("") is None
        self.seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as last synced
        self.rounds = 0
        self.seconds = 0.0  # time spent in rounds (on the background thread when started)
        self._want = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def mark_current(self) -> None:
        """Treat what the directory holds now as synced (it was just downloaded from storage)."""
        self.seen = {name: key for name, _, key in self._files()}

    def _files(self, under: str = ""):
        for p in sorted((self.local_dir / under).rglob("*")):
            if p.name.startswith(TEMP_PREFIX) or p.name == INDEX:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # replaced or removed while listing
            if p.is_file():
                yield p.relative_to(self.local_dir).as_posix(), p, (st.st_size, st.st_mtime_ns)

    def sync_now(self, under: str = "") -> int:
        """One round, on the calling thread (of the files ``under`` a sub-folder, when given):
        returns how many files it synced."""
        with self._lock:
            t0 = time.perf_counter()
            entries = {}
            if under and not (self.local_dir / under).is_dir():
                return 0
            for name, path, key in self._files(under):
                if self.seen.get(name) == key:
                    continue
                if not entries:
                    self._check_fence()
                try:
                    entry = self._sync_file(name, path)
                except FileNotFoundError:
                    continue
                if entry is not None:
                    entries[name] = entry
                    self.seen[name] = entry["stat"]
            if entries:
                self._check_fence()
                self.storage.record(self.prefix, entries)
            self.rounds += 1
            self.seconds += time.perf_counter() - t0
            return len(entries)

    def _check_fence(self) -> None:
        if self.fence is None:
            return
        try:
            held = self.fence()
        except Exception as exc:  # no write without a confirmed lease; the lease thread judges outages
            raise Fenced(f"could not confirm the job's lease ({exc}); nothing written this round") from exc
        if not held:
            self.fenced_out = True
            raise Fenced("this attempt no longer holds the job's lease; its writes are refused")

    def _sync_file(self, name: str, path: Path) -> dict | None:
        rel = f"{self.prefix}/{name}"
        if self.remote:
            return self.storage.upload(path, rel)
        with open(path, "rb") as f:  # local storage: the file is the artifact; hash it
            st = os.fstat(f.fileno())
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
        now = path.stat()
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return None  # replaced while hashing: the next round takes the new one
        entry = self.storage.entry(rel, h.hexdigest(), st.st_size)
        return {**entry, "stat": (st.st_size, st.st_mtime_ns)}

    # ------------------------------------------------------------ background rounds
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kiln-sync", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a round soon (after each epoch); returns at once."""
        if self._thread is None:
            self._guarded()
            return
        self._want.set()

    def _loop(self) -> None:
        while True:
            requested = self._want.wait(self.poll_s)
            self._want.clear()
            if self._stop:
                break
            self._guarded("" if requested else CHECKPOINTS)

    def _guarded(self, under: str = "") -> None:
        try:
            self.sync_now(under)
        except Fenced as exc:
            log.error("sync refused: %s", exc)
        except Exception as exc:  # the next round retries; the final one is waited for
            (log.warning if not under else log.debug)("syncing the job directory to storage failed: %s", exc)

    def close(self, retry_for_s: float = 0.0) -> bool:
        """Stop the background thread (after its round in flight), then one last round here, tried
        again for up to ``retry_for_s`` while it fails for any reason but a refused fence (a store or
        storage outage). True when the last round went through."""
        if self._thread is not None:
            self._stop = True
            self._want.set()
            self._thread.join()
            self._thread = None
        deadline = time.monotonic() + retry_for_s
        while True:
            try:
                self.sync_now()
                return True
            except Exception as exc:
                if self.fenced_out or time.monotonic() >= deadline:
                    log.error("the last sync of the job directory failed: %s", exc)
                    return False
                log.warning("the last sync of the job directory failed (%s); trying again", exc)
                time.sleep(0.5)
