"""The dashboard at ``/``: one server-rendered page; the browser polls the JSON API.

No build step and no CDN: web/static holds plain JavaScript (charts drawn on a
<canvas>) and CSS. The page itself is public; the API calls it makes carry the
token the user pastes once (kept in sessionStorage for the tab's lifetime).
"""
from __future__ import annotations

from flask import Blueprint, render_template

from web.context import settings

# Own static route (/ui/...) so the page works whatever the app's static folder is.
bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/ui")


@bp.get("/")
def index():
    """The dashboard page: jobs with progress, a job's live curves, log and artifacts, models."""
    return render_template("dashboard.html", auth_enabled=settings().auth_enabled)
