"""Kiln's Flask app factory (flaskr style): no connection, model load or torch import at import time.

Flask itself is imported inside the factory, so ``web.client`` (the `kiln` CLI, HTTP only)
imports without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask


def create_app(settings=None) -> "Flask":
    """Build the app from ``settings`` (None: read the environment once, here)."""
    from flask import Flask

    from configs import Settings
    from worker.service import Kiln

    settings = settings if settings is not None else Settings.from_env()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_request_bytes, KILN_SETTINGS=settings,
                      JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    # An API answers '//' with JSON 404, not an HTML redirect (and '/artifacts//etc/x' never matches).
    app.url_map.merge_slashes = False
    app.extensions["kiln"] = Kiln(settings)  # cheap: the facade connects lazily

    from web import auth, dashboard, datasets, errors, health, jobs, metrics, models_api, openapi, predict, workers

    errors.init_app(app)
    metrics.init_app(app)  # registers /metrics; its hooks go first, so requests auth refuses are timed too
    errors.init_guards(app)  # body limits, NUL and JSON depth: before auth reads the store
    auth.init_app(app)
    for module in (health, jobs, datasets, auth, openapi, models_api, predict, dashboard, workers):
        app.register_blueprint(module.bp)
    from web import retention  # the DELETE routes
    app.register_blueprint(retention.bp)
    predict.install(app)  # a raw-image POST /predict skips Flask's per-request machinery (same checks, same answers)
    return app
