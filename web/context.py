"""The one way web code reaches the app's Settings and its Kiln facade (both set by create_app)."""
from __future__ import annotations

from flask import Flask, current_app


def settings(app: Flask | None = None):
    """The Settings the app was built from (the current app's unless ``app`` is given)."""
    return (app or current_app).config["KILN_SETTINGS"]


def kiln(app: Flask | None = None):
    """The app's worker.service.Kiln facade."""
    return (app or current_app).extensions["kiln"]
