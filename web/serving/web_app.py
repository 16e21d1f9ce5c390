"""Web process: one Flask app's serving state (its ForwardClient and ModelCache), made on first use.

Also where registration's artifact build is sent to the forward process, so no web route imports torch,
and where /ready reads each served model's readiness (from the last heartbeat: no call to the forward process).
"""
from __future__ import annotations

import os
import threading

from flask import current_app

from web import context
from web.serving.web_client import HEARTBEAT_S, ForwardClient, ForwardError
from web.serving.web_models import ModelCache
from web.serving.web_place import SocketPlace
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

    def __init__(self, settings, resolve, *, max_queue: int | None = None):
        """``max_queue``: inputs of one model that may wait (settings.predict_queue_max when None)."""
        loaded = max_loaded_models(settings)
        self.forward = ForwardClient(workers=forward_workers(settings), max_batch_size=settings.max_batch_size,
                                     max_delay_ms=settings.max_delay_ms, max_models=loaded,
                                     max_queue=settings.predict_queue_max if max_queue is None else max_queue,
                                     address=SocketPlace.from_settings(settings), hang_s=settings.forward_hang_s)
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

    def readiness(self) -> dict[str, dict]:
        """One check per model version this process serves, as /ready lists them ({"ok", ...}).

        Not ready: the forward process has sent no heartbeat answer for longer than it may (it is
        being replaced), or the version's queue is full. With no connection (nothing served yet,
        or the forward process is gone) every version is ready: the next request starts one.
        """
        served = self.models.served()
        silent = self.forward.silent_s()  # None: not connected
        health = self.forward.health
        report = {} if health is None else health[1]
        queued = {(name, version): n for name, version, n in report.get("queued", [])}
        limit = report.get("max_queue", self.forward.max_queue)
        checks = {}
        for s in served:
            check = {"ok": True, "runtime": s.model.runtime, "queued": queued.get((s.name, s.version), 0),
                     "max_queue": limit}
            if silent is not None and silent > self.forward.hang_s + 2 * HEARTBEAT_S:
                check.update(ok=False, error="ForwardUnresponsive: no heartbeat answer from the forward process")
            elif check["queued"] >= limit:
                check.update(ok=False, error=f"QueueFull: {check['queued']} inputs wait (at most {limit})")
            checks[f"model {s.name}:{s.version}"] = check
        return checks

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


def readiness(app=None) -> dict[str, dict]:
    """Per-model checks for /ready: {"model <name>:<version>": {"ok", "runtime", "queued", "max_queue"
    [, "error"]}} for the versions this web process serves; {} before it serves any. Never blocks."""
    state = (app or current_app).extensions.get(EXTENSION)
    return {} if state is None else state.readiness()
