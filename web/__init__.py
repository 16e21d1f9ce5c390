"""Kiln's Flask app factory (flaskr style): no connection, model load or torch import at import time."""
from __future__ import annotations

from flask import Flask


def create_app(settings=None) -> Flask:
    """Build the app from ``settings`` (None: read the environment once, here)."""
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

    from web import auth, datasets, errors, health, jobs, metrics, openapi

    errors.init_app(app)
    metrics.init_app(app)  # before auth, so refused requests are timed too
    auth.init_app(app)
    for module in (health, jobs, datasets, openapi):
        app.register_blueprint(module.bp)

    # --- serving engineer's blueprints (web/models_api.py, web/predict.py) ---
    from web import models_api, predict

    app.register_blueprint(models_api.bp)
    app.register_blueprint(predict.bp)
    # --- end serving blueprints; dashboard / metrics blueprints register below ---
    from web import dashboard

    app.register_blueprint(dashboard.bp)
    return app
