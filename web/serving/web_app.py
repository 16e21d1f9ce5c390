"""Web process: one Flask app's serving state (its ForwardClient and ModelCache), made on first use.

Also where registration's artifact build is sent to the forward process, so no web route imports torch.
"""
from __future__ import annotations

import os
import threading

from flask import current_app

from web import context
from web.serving.web_client import ForwardClient, ForwardError, SocketPlace
from web.serving.web_models import ModelCache
from worker.errors import InvalidInput

EXTENSION = "kiln.serving"
_lock = threading.Lock()


def max_loaded_models(settings) -> int:
    """Model versions kept loaded in the forward process (and tracked per web process), LRU beyond."""
    return max(1, settings.max_loaded_models)


def forward_workers(settings) -> int:
    """Forward workers (one intra-op thread each): settings.forward_workers, else one per core for
    the host's shared forward process (single-threaded workers share cores with the web
    processes without stalling), or cores // web workers for private ones."""
    if settings.forward_workers > 0:
        return settings.forward_workers
    cores = os.cpu_count() or 1
    if settings.forward_socket != "private":
        return cores
    workers = int(os.environ.get("WEB_CONCURRENCY", "1") or 1)  # set by gunicorn deployments
    return max(1, cores // max(1, workers))


class Serving:
    """The forward connection of this web process and the model versions it serves through it."""

    def __init__(self, settings, resolve):
        loaded = max_loaded_models(settings)
        self.forward = ForwardClient(workers=forward_workers(settings), max_batch_size=settings.max_batch_size,
                                     max_delay_ms=settings.max_delay_ms, max_models=loaded,
                                     address=SocketPlace.from_settings(settings))
        self.models = ModelCache(resolve, self.forward, refresh_s=settings.model_refresh_s, max_loaded=loaded)

    def build_artifacts(self, src, out_dir, **meta) -> dict:
        """``worker.registry.write_artifacts`` for ``Registry.register_model(build=...)``, in the forward process.

        InvalidInput raised there (a checkpoint that is not Kiln's) is raised again here: 422, as in-process.
        """
        try:
            return self.forward.build(src, out_dir, **meta)
        except ForwardError as exc:
            if exc.kind == "InvalidInput":
                raise InvalidInput(exc.detail) from None
            raise

    def close(self) -> None:
        self.models.clear()
        self.forward.close()


def serving(app=None) -> Serving:
    """The (current) app's Serving, created on first use (no connection until a request needs one)."""
    app = app or current_app
    state = app.extensions.get(EXTENSION)
    if state is None:
        with _lock:
            state = app.extensions.get(EXTENSION)
            if state is None:
                state = Serving(context.settings(app), context.kiln(app).resolve_model)
                app.extensions[EXTENSION] = state
    return state
