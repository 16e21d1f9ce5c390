"""/health (liveness: the process answers) and /ready (store, broker and storage reachable).

/ready is public, so it names the dependency that is down and the kind of failure, never
the exception's text (hostnames, DSNs, paths): that goes to the log, and to a caller
presenting an admin token.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from web.context import kiln, settings
from web.errors import error_response
from web.schemas import doc
from web.serving.web_app import readiness as serving_readiness
from worker.errors import RETRY_AFTER_S
from worker.tokens import allows

bp = Blueprint("health", __name__)


@bp.get("/health")
@doc(responses={200: ("the process is alive", "Health")})
def health():
    """Liveness: no dependency is called, so a slow database never restarts the web pods."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
@doc(responses={200: ("every dependency answered", "Ready"),
                503: "a dependency failed; details names each check (an admin token also sees why)"})
def ready():
    """Readiness: the facade checks the store, the broker and the storage."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    try:
        checks = kiln().health()
        checks.update(serving_readiness())  # one check per model version this web process serves
    except Exception as exc:  # a readiness probe answers 503, never 500
        current_app.logger.warning("readiness check raised: %s", exc)
        return error_response(503, "not_ready", "health check failed; the server log has the details", None, retry)
    failed = [name for name, check in checks.items() if not check.get("ok")]
    if not failed:
        return jsonify({"status": "ok", "checks": checks})
    for name in failed:
        current_app.logger.warning("not ready: %s: %s", name, checks[name].get("error"))
    shown = checks if _admin() else {name: _public(check) for name, check in checks.items()}
    return error_response(503, "not_ready", f"not ready: {', '.join(failed)} unavailable", shown, retry)


def _public(check: dict) -> dict:
    """A check without its exception text: {"ok"} and, when it failed, the exception's class name."""
    if check.get("ok"):
        return {"ok": True}
    kind = str(check.get("error") or "error").split(":", 1)[0].strip()
    return {"ok": False, "error": kind if kind.isidentifier() else "error"}


def _admin() -> bool:
    """Whether the request carries a valid admin token (auth on); never raises."""
    if not settings().auth_enabled:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    from web.auth import token_store

    try:
        row = token_store().verify(value.strip())
    except Exception:  # noqa: BLE001 - the store may be what is down
        return False
    return row is not None and allows(row["scopes"], "admin")
