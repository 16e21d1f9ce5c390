"""Web process: ``ModelCache`` maps model references to versions loaded in the forward process (``RemoteModel``).

It follows alias moves without failing a request and keeps at most ``max_loaded`` versions
(least recently used go first, and the references that pointed at them are forgotten).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ml import images
from web.serving.web_client import ForwardClient

log = logging.getLogger(__name__)


class RemoteModel:
    """A model version loaded in the forward process, as a web process sees it: classes, input geometry, runtime."""

    def __init__(self, key: tuple[str, int], path: str, runtime: str, description: dict, forward: ForwardClient):
        self.key, self.path, self.forward = key, str(path), forward
        self.classes = [str(c) for c in description["classes"]]
        self.image_size, self.in_channels = int(description["image_size"]), int(description["in_channels"])
        self.card_runtime = runtime  # what the card chose: a restarted forward process loads it again
        self.runtime = str(description.get("runtime") or "eager")  # what serves (eager if it would not load)

    def prepare(self, x, index: int = 0):
        """One decoded input -> uint8 [S,S,C] through this model's eval transform (ValueError names it)."""
        return images.prepare(x, index, self.image_size, self.in_channels)

    def label_rows(self, values, indices) -> list[dict]:
        return images.label_rows(self.classes, values, indices)

    def submit(self, arrays, top_k: int):
        """Future of this version's top-k rows for uint8 inputs [N,S,S,C] (batched in the forward process)."""
        return self.forward.run(self.key, self.path, arrays, top_k, self.card_runtime)


class Served:
    """One loaded model version: its name, version and RemoteModel."""

    def __init__(self, name: str, version: int, model: RemoteModel):
        self.name, self.version, self.model = name, version, model


class _Ref:
    def __init__(self, key: tuple[str, int], checked: float, pinned: bool):
        self.key, self.checked, self.pinned = key, checked, pinned
        self.loading: tuple[str, int] | None = None


class ModelCache:
    """Per-process cache: model ref -> loaded version, with alias refresh and no-downtime swaps.

    ``resolve(ref) -> {name, version, path, card}`` comes from the registry. A ref
    with an explicit version never moves; every ref is re-resolved at most every
    ``refresh_s`` (a deleted version answers 404 from then on: ``forget``). When one
    moves, the new version loads in the background while the old one keeps
    answering; then the ref switches over.
    Beyond ``max_loaded`` versions the least recently used is dropped here and in the
    forward process, whatever refers to it: a client walking through every version
    costs loads, never memory.
    """

    def __init__(self, resolve: Callable[[str], dict], forward: ForwardClient, *, refresh_s: float = 2.0,
                 max_loaded: int = 4):
        self._resolve, self.forward = resolve, forward
        self.refresh_s, self.max_loaded = refresh_s, max_loaded
        self._refs: dict[str, _Ref] = {}
        self._models: dict[tuple[str, int], Served] = {}  # insertion order = LRU order
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], threading.Lock] = {}

    def get(self, ref: str) -> Served:
        """The served model for ``ref`` (loads it on first use); registry errors propagate."""
        now = time.monotonic()
        with self._lock:
            entry = self._refs.get(ref)
            # a pinned ref (name:version) is re-resolved too: the version may have been deleted
            fresh = entry is not None and now - entry.checked < self.refresh_s
            if entry is not None and not fresh:
                entry.checked = now  # one thread re-resolves; the others keep the current version
            current = self._models.get(entry.key) if entry else None
        if fresh and current is not None:
            return self._touch(current)
        try:
            info = self._resolve(ref)
        except Exception as exc:
            if current is not None and getattr(exc, "status", 500) == 404:
                self.forget(current.name, current.version)  # deleted: never served from here again
            if current is None or getattr(exc, "status", 500) == 404:
                raise
            log.warning("re-resolving %s failed (%s); still serving version %s", ref, exc, current.version)
            return current
        key = (info["name"], int(info["version"]))
        if current is not None and key != entry.key:
            self._swap_in_background(ref, entry, key, info)
            return current
        served = self._load(key, info)
        with self._lock:
            self._refs[ref] = _Ref(key, now, pinned=":" in ref)
        return served

    def _touch(self, served: Served) -> Served:
        with self._lock:
            key = (served.name, served.version)
            if key in self._models:
                self._models[key] = self._models.pop(key)
        return served

    def _swap_in_background(self, ref: str, entry: _Ref, key: tuple[str, int], info: dict) -> None:
        with self._lock:
            if entry.loading == key:
                return
            entry.loading = key

        def work():
            try:
                self._load(key, info)
                with self._lock:
                    entry.key = key
                log.info("%s now serves %s version %s", ref, key[0], key[1])
            except Exception:  # noqa: BLE001 - keep serving the old version, retry on next refresh
                log.exception("loading %s version %s for %s failed", key[0], key[1], ref)
            finally:
                with self._lock:
                    entry.loading = None

        threading.Thread(target=work, name=f"kiln-load-{key[0]}-{key[1]}", daemon=True).start()

    def _load(self, key: tuple[str, int], info: dict) -> Served:
        with self._lock:
            if key in self._models:
                self._models[key] = self._models.pop(key)  # most recently used
                return self._models[key]
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:  # one load per version; requests for other models are not blocked
            with self._lock:
                if key in self._models:
                    return self._models[key]
            runtime = (info.get("runtime") or {}).get("name") or "eager"
            described = self.forward.load(key, info["path"], runtime)
            model = RemoteModel(key, info["path"], runtime, described, self.forward)
            served = Served(key[0], key[1], model)
            with self._lock:
                self._models[key] = served
                evicted = self._evict()
            for old in evicted:  # the forward process drops it once no web process uses it
                threading.Thread(target=self.forward.unload, args=((old.name, old.version),),
                                 name="kiln-unload", daemon=True).start()
            log.info("loaded model %s version %s", key[0], key[1])
            return served

    def _evict(self) -> list[Served]:
        """Drop the least recently used versions beyond ``max_loaded`` (lock held) and the refs to them."""
        swapping = {r.loading for r in self._refs.values() if r.loading is not None}
        out = []
        for k in list(self._models):
            if len(self._models) <= self.max_loaded:
                break
            if k not in swapping:
                out.append(self._models.pop(k))
        gone = {(s.name, s.version) for s in out}
        for ref in [ref for ref, r in self._refs.items() if r.key in gone and r.loading is None]:
            del self._refs[ref]  # its next request resolves and loads it again
        return out

    def forget(self, name: str, version: int) -> None:
        """Stop serving a (deleted) version: drop it and every ref to it here and in the forward process."""
        key = (name, version)
        with self._lock:
            served = self._models.pop(key, None)
            for ref in [ref for ref, r in self._refs.items() if r.key == key]:
                del self._refs[ref]
        if served is not None:
            threading.Thread(target=self.forward.unload, args=(key,), name="kiln-unload", daemon=True).start()

    def loaded(self) -> list[tuple[str, int]]:
        """The versions this process serves now, least recently used first."""
        with self._lock:
            return list(self._models)

    def served(self) -> list[Served]:
        """The versions this process serves now, as Served, least recently used first."""
        with self._lock:
            return list(self._models.values())

    def clear(self) -> None:
        """Forget every loaded version and ref (the forward connection stays with its owner)."""
        with self._lock:
            self._models = {}
            self._refs.clear()
