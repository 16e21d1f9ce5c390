"""Bearer-token auth: one before_request hook and one endpoint -> scope table.

Every /v1 endpoint and /predict need ``Authorization: Bearer <token>`` carrying the
scope listed for the endpoint below (admin implies all, submit implies read). An
endpoint under /v1 or /predict missing from the table needs admin, so a new route
fails closed; a test checks that every such route is listed. /health, /ready,
/metrics (unless ``protect_metrics``), /openapi.json, /docs, the dashboard page and
static files are public. Tokens are managed over HTTP (``/v1/tokens``, admin) or with
``flask --app web tokens create|list|revoke``. Token checks are cached for a few
seconds (Settings.token_cache_s); a store that is down answers 503, not 500.
"""
from __future__ import annotations

import json
import sys

import click
from flask import Blueprint, current_app, g, jsonify, request
from flask.cli import AppGroup

from web.context import settings as app_settings
from web.schemas import TOKEN_CREATE, doc, parse_datetime, validate
from worker.db import migrate
from worker.errors import Conflict, Forbidden, KilnError, Unauthorized
from worker.tokens import SCOPES, TokenStore, allows

bp = Blueprint("tokens", __name__, url_prefix="/v1/tokens")

# endpoint -> scope. read: GETs; submit: create/cancel jobs, upload datasets;
# predict: /predict; admin: the model registry's writes (and everything else).
ENDPOINT_SCOPES: dict[str, str] = {
    # jobs
    "jobs.submit": "submit",
    "jobs.list_jobs": "read",
    "jobs.get_job": "read",
    "jobs.cancel": "submit",
    "jobs.retry": "submit",
    "jobs.logs": "read",
    "jobs.metrics": "read",
    "jobs.artifacts": "read",
    "jobs.download": "read",
    # datasets
    "datasets.create": "submit",
    "datasets.list_datasets": "read",
    "datasets.get_dataset": "read",
    # deletes: whoever may create a thing may delete it (jobs, datasets: submit; model versions: admin)
    "retention.delete_job": "submit",
    "retention.delete_dataset": "submit",
    "retention.delete_model_version": "admin",
    # models
    "models_api.register": "admin",
    "models_api.list_models": "read",
    "models_api.get_model": "read",
    "models_api.set_alias": "admin",
    # predict
    "predict.predict": "predict",
    # workers
    "workers.list_all": "read",
    # tokens
    "tokens.create": "admin",
    "tokens.list_tokens": "admin",
    "tokens.revoke": "admin",
}
METRICS_ENDPOINT = "metrics.metrics"
PROTECTED_PREFIXES = ("/v1/", "/predict")


def token_store(app=None) -> TokenStore:
    """The app's TokenStore, built once from its settings (shares worker.db's engine)."""
    app = app or current_app._get_current_object()
    store = app.extensions.get("kiln.tokens")
    if store is None:
        settings = app_settings(app)
        store = app.extensions["kiln.tokens"] = TokenStore.from_settings(
            settings, cache_ttl_s=settings.token_cache_s)
    return store


def protected(path: str) -> bool:
    return path == "/predict" or path.startswith(PROTECTED_PREFIXES)


def required_scope(endpoint: str | None, rule: str | None, settings) -> str | None:
    """The scope a request to this endpoint needs, or None when it is public."""
    if endpoint == METRICS_ENDPOINT or rule == "/metrics":
        return "read" if settings.protect_metrics else None
    if endpoint in ENDPOINT_SCOPES:
        return ENDPOINT_SCOPES[endpoint]
    if rule is not None and protected(rule):
        return "admin"  # fail closed: an unlisted API route is admin-only until it is listed
    return None


def _bearer() -> str | None:
    return bearer(request.headers.get("Authorization", ""))


def bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def granted(app, header: str, endpoint: str) -> bool:
    """Whether a request to ``endpoint`` with this Authorization header value passes ``check_request``
    (always with auth off). For a path that bypasses Flask: on False it hands the request to Flask,
    whose check says why (401, 403, or 503 when the store is down), so nothing is raised here."""
    settings = app_settings(app)
    if not settings.auth_enabled:
        return True
    token = bearer(header)
    if token is None:
        return False
    try:
        row = token_store(app).verify(token)
    except Exception:  # noqa: BLE001 - check_request meets it again and answers for it
        return False
    return row is not None and allows(row["scopes"], ENDPOINT_SCOPES[endpoint])


def check_request():
    """before_request: 401 without a valid token, 403 without the endpoint's scope."""
    app = current_app._get_current_object()
    settings = app_settings(app)
    if not settings.auth_enabled or request.method == "OPTIONS":
        return None
    rule = request.url_rule.rule if request.url_rule is not None else None
    scope = required_scope(request.endpoint, rule, settings)
    if scope is None:
        return None
    token = _bearer()
    if token is None:
        g.kiln_auth_failed = True
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' "
                           "(create one with `flask --app web tokens create --name NAME --scope read`)")
    row = token_store(app).verify(token)
    if row is None:
        g.kiln_auth_failed = True
        raise Unauthorized("invalid, expired or revoked token")
    if not allows(row["scopes"], scope):
        raise Forbidden(f"token {row['name']!r} lacks the {scope!r} scope this endpoint needs "
                        f"(it has: {', '.join(row['scopes'])})", {"required": scope, "scopes": row["scopes"]})
    g.kiln_token = row
    return None


def _challenge(response):
    # RFC 6750: a 401 tells the client which scheme to use.
    if response.status_code == 401 and g.get("kiln_auth_failed"):
        response.headers["WWW-Authenticate"] = 'Bearer realm="kiln"'
    return response


tokens_cli = AppGroup("tokens", help="Create, list and revoke API access tokens.")


def _cli_store() -> TokenStore:
    app = current_app._get_current_object()
    migrate(app_settings(app))  # idempotent; lets `tokens create` work on a fresh home
    return token_store(app)


def _fail(exc: KilnError):
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(1)


@tokens_cli.command("create")
@click.option("--name", required=True, help="A label for the token (who or what uses it).")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(SCOPES),
              help="read, submit (implies read), predict or admin (implies all); repeat for several.")
@click.option("--expires-in", "expires_in", type=click.IntRange(1), default=None,
              help="Seconds until the token expires (default: never).")
def create_cmd(name, scopes, expires_in):
    """Create a token and print it once (only its hash is stored)."""
    try:
        token, row = _cli_store().create(name, list(scopes), expires_in_s=expires_in)
    except KilnError as exc:
        _fail(exc)
    click.echo(token)
    click.echo(f"created token {row['name']!r} (id {row['id']}, scopes: {', '.join(row['scopes'])}); "
               "it is shown only now: store it safely", err=True)


@tokens_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(as_json):
    """List tokens (names, scopes, dates; never the tokens themselves)."""
    rows = _cli_store().list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':<34} {'NAME':<20} {'SCOPES':<22} {'CREATED':<26} {'EXPIRES':<26} {'LAST USED':<26} REVOKED")
    for r in rows:
        click.echo(f"{r['id']:<34} {r['name']:<20} {','.join(r['scopes']):<22} {r['created_at'] or '':<26} "
                   f"{r['expires_at'] or '-':<26} {r['last_used_at'] or '-':<26} {r['revoked_at'] or '-'}")


@tokens_cli.command("revoke")
@click.argument("name_or_id")
def revoke_cmd(name_or_id):
    """Revoke a token by id, or every active token with that name."""
    try:
        rows = _cli_store().revoke(name_or_id)
    except KilnError as exc:
        _fail(exc)
    for r in rows:
        click.echo(f"revoked {r['name']!r} (id {r['id']})")


# ------------------------------------------------------------------ /v1/tokens (admin)

@bp.post("")
@doc(body="TokenCreate", responses={201: ("the token; `token` is its secret, shown only in this answer",
                                          "TokenCreated"),
                                     409: "an active token has this name", 415: "not a JSON body",
                                     422: "invalid body (one detail per field), or expires_at in the past"},
     links={201: {"RevokeToken": ("tokens.revoke", {"token_id": "$response.body#/id"})}})
def create():
    """Create a token with scopes and an optional expiry; the secret is shown once."""
    body = validate(TOKEN_CREATE, request.get_json())
    expires_at = parse_datetime(body["expires_at"]) if "expires_at" in body else None
    token, row = token_store().create(body["name"], body["scopes"], expires_at=expires_at,
                                      expires_in_s=body.get("expires_in_s"))
    return jsonify({**row, "token": token}), 201


@bp.get("")
@doc(responses={200: ("every token, oldest first: scopes, expiry, last use, revocation (never a secret)",
                      "TokenList")})
def list_tokens():
    """Every token with its scopes, expiry and last use (last use is written at most once a minute)."""
    return jsonify({"tokens": token_store().list()})


@bp.delete("/<token_id>")
@doc(responses={200: ("the revoked token", "Token"), 404: "no active token with this id",
                409: "a token cannot revoke itself (use another admin token, or the CLI)"})
def revoke(token_id: str):
    """Revoke a token: it stops working at once here, and within seconds on every web process.

    The token making the request cannot revoke itself, so an admin cannot lock itself out by mistake.
    """
    own = g.get("kiln_token")
    if own is not None and own["id"] == token_id:
        raise Conflict("a token cannot revoke itself; revoke it with another admin token or "
                       "`flask --app web tokens revoke`")
    return jsonify(token_store().revoke_id(token_id))


def init_app(app) -> None:
    """Install the auth hook and the `tokens` CLI group on the app."""
    app.before_request(check_request)
    app.after_request(_challenge)
    app.cli.add_command(tokens_cli)
