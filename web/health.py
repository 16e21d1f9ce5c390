"""/health (liveness: the process answers) and /ready (store, broker and storage reachable)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from web.context import kiln

from web.errors import error_response
from web.schemas import doc

bp = Blueprint("health", __name__)


@bp.get("/health")
@doc(responses={200: "the process is alive"})
def health():
    """Liveness: no dependency is called, so a slow database never restarts the web pods."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
@doc(responses={200: "every dependency answered", 503: "a dependency failed; details has each check"})
def ready():
    """Readiness: the facade checks the store, the broker and the storage."""
    try:
        checks = kiln().health()
    except Exception as exc:  # a readiness probe answers 503, never 500
        current_app.logger.warning("readiness check raised: %s", exc)
        return error_response(503, "not_ready", f"health check failed: {exc}", None)
    failed = [name for name, check in checks.items() if not check.get("ok")]
    if failed:
        reasons = "; ".join(f"{n}: {checks[n].get('error', 'not ok')}" for n in failed)
        return error_response(503, "not_ready", f"not ready: {reasons}", checks)
    return jsonify({"status": "ok", "checks": checks})
