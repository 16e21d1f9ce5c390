"""Forward process: the model versions it holds, each a Predictor served by the runtime its card chose.

At most ``max_models`` stay loaded; the least recently used go first (a request for one loads it again).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ml import runtimes
from ml.inference import Predictor

log = logging.getLogger(__name__)


def runtime_name(value) -> str | None:
    """The runtime a request names (a card's choice; None: eager), checked for its type only."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"a runtime is named by a string, got {type(value).__name__}")
    return value


def model_key(value) -> tuple[str, int]:
    """A model key as the wire carries it, [name, version] -> (name, version)."""
    name, version = value
    if not isinstance(name, str) or type(version) is not int:
        raise ValueError(f"a model key is [name, version], got {value!r}")
    return name, version


class Model:
    """A loaded version: its Predictor (which describes it), the runtime that serves it, and why not another."""

    __slots__ = ("key", "predictor", "runtime", "fallback")

    def __init__(self, key: tuple[str, int], predictor: Predictor, runtime, fallback: str | None):
        self.key, self.predictor, self.runtime, self.fallback = key, predictor, runtime, fallback

    def describe(self) -> dict:
        return {**self.predictor.describe(), "runtime": self.runtime.name, "fallback": self.fallback}

    def top_k(self, arrays: np.ndarray, k: int, threads: int) -> tuple[list, list]:
        """uint8 inputs [N,S,S,C] -> the k best (probabilities, class indices) per input."""
        return runtimes.top_k(self.runtime.probabilities(arrays, threads), k)


class Models:
    """Loaded versions by key, least recently used first; safe to use from any thread."""

    def __init__(self, device: str, max_models: int):
        self.device, self.max_models = device, max(1, max_models)
        self._loaded: OrderedDict[tuple, Model] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Model | None:
        """The loaded version (now the most recently used), or None."""
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                self._loaded.move_to_end(key)
            return model

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._loaded

    def load(self, key: tuple, path: str, runtime: str | None) -> Model:
        """``key`` loaded from model.pt at ``path``, served by ``runtime`` (its file beside model.pt) unless
        it is loaded already; may evict the least recently used."""
        model = self.get(key)
        if model is not None:
            return model
        predictor = Predictor.from_checkpoint(path, device=self.device)
        runtime, fallback = runtimes.load(predictor, runtime, Path(path).parent)
        if fallback:
            log.warning("model %s version %s serves with %s: %s", key[0], key[1], runtime.name, fallback)
        with self._lock:
            model = self._loaded.setdefault(key, Model(key, predictor, runtime, fallback))
            self._loaded.move_to_end(key)
            evicted = [self._loaded.popitem(last=False)[0] for _ in range(len(self._loaded) - self.max_models)]
        log.info("loaded model %s version %s from %s (%s)", key[0], key[1], path, model.runtime.name)
        for old in evicted:  # a forward pass still running on it keeps its own reference
            log.info("unloaded model %s version %s (least recently used; --max-models %d)", old[0], old[1],
                     self.max_models)
        return model

    def pop(self, key: tuple) -> Model | None:
        with self._lock:
            model = self._loaded.pop(key, None)
        if model is not None:
            log.info("unloaded model %s version %s", key[0], key[1])
        return model

    def keys(self) -> list[tuple]:
        """Loaded keys, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def runtimes(self) -> list[list]:
        """[name, version, runtime] of every loaded version."""
        with self._lock:
            return [[k[0], k[1], m.runtime.name] for k, m in self._loaded.items()]
