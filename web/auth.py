"""Bearer-token auth: one before_request hook and one endpoint -> scope table.

Every /v1 endpoint and /predict need ``Authorization: Bearer <token>`` carrying the
scope listed for the endpoint below (admin implies all). An endpoint under /v1 or
/predict missing from the table needs admin, so a new route fails closed; a test
checks that every such route is listed. /health, /ready, /metrics (unless
``protect_metrics``), the dashboard page and static files are public.
``flask --app web tokens create|list|revoke`` manages tokens.
"""
from __future__ import annotations

import json
import sys

import click
from flask import current_app, g, request
from flask.cli import AppGroup

from web.context import settings as app_settings
from worker.db import migrate
from worker.errors import Forbidden, KilnError, Unauthorized
from worker.tokens import SCOPES, TokenStore, allows

# endpoint -> scope. read: GETs; submit: create/cancel jobs, upload datasets;
# predict: /predict; admin: the model registry's writes (and everything else).
ENDPOINT_SCOPES: dict[str, str] = {
    # jobs
    "jobs.submit": "submit",
    "jobs.list_jobs": "read",
    "jobs.get_job": "read",
    "jobs.cancel": "submit",
    "jobs.logs": "read",
    "jobs.metrics": "read",
    "jobs.artifacts": "read",
    "jobs.download": "read",
    # datasets
    "datasets.create": "submit",
    "datasets.list_datasets": "read",
    "datasets.get_dataset": "read",
    # models
    "models_api.register": "admin",
    "models_api.list_models": "read",
    "models_api.get_model": "read",
    "models_api.set_alias": "admin",
    # predict
    "predict.predict": "predict",
}
METRICS_ENDPOINT = "metrics.metrics"
PROTECTED_PREFIXES = ("/v1/", "/predict")


def token_store(app=None) -> TokenStore:
    """The app's TokenStore, built once from its settings (shares worker.db's engine)."""
    app = app or current_app._get_current_object()
    store = app.extensions.get("kiln.tokens")
    if store is None:
        store = app.extensions["kiln.tokens"] = TokenStore.from_settings(app_settings(app))
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
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


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
        raise Unauthorized("invalid or revoked token")
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
              help="read, submit, predict or admin (admin implies all); repeat for several.")
def create_cmd(name, scopes):
    """Create a token and print it once (only its hash is stored)."""
    try:
        token, row = _cli_store().create(name, list(scopes))
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
    click.echo(f"{'ID':<34} {'NAME':<20} {'SCOPES':<22} {'CREATED':<28} REVOKED")
    for r in rows:
        click.echo(f"{r['id']:<34} {r['name']:<20} {','.join(r['scopes']):<22} {r['created_at'] or '':<28} "
                   f"{r['revoked_at'] or '-'}")


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


def init_app(app) -> None:
    """Install the auth hook and the `tokens` CLI group on the app."""
    app.before_request(check_request)
    app.after_request(_challenge)
    app.cli.add_command(tokens_cli)
