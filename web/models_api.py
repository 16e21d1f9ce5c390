"""/v1/models: register a finished job's checkpoint as a model version, list, move aliases.

Registering builds the version's artifacts in the forward process (web/serving/), not in this one.
"""
from __future__ import annotations

import re

from flask import Blueprint, jsonify, request

from web import context
from web.serving.web_app import serving
from worker.errors import InvalidInput

bp = Blueprint("models_api", __name__, url_prefix="/v1/models")

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _body(fields: dict) -> dict:
    """A JSON object with the given {field: (types, required)}; one message per bad field."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object", [{"field": "body", "message": "must be a JSON object"}])
    errors = [{"field": k, "message": "unknown key; allowed: " + ", ".join(fields)} for k in data if k not in fields]
    for key, (types, required) in fields.items():
        if key not in data:
            if required:
                errors.append({"field": key, "message": "is required"})
        elif isinstance(data[key], bool) and bool not in types or not isinstance(data[key], types):
            errors.append({"field": key, "message": f"must be {' or '.join(t.__name__ for t in types)}"})
    if errors:
        raise InvalidInput("invalid request body: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                           errors)
    return data


@bp.post("")
def register():
    """Register a succeeded job's best (or last) checkpoint as the next version of a model."""
    data = _body({"name": ((str,), True), "job_id": ((str,), True), "checkpoint": ((str,), False)})
    if not re.fullmatch(NAME_RE, data["name"]):
        raise InvalidInput(f"model name {data['name']!r} must match {NAME_RE}",
                           [{"field": "name", "message": f"must match {NAME_RE}"}])
    checkpoint = data.get("checkpoint", "best")
    if checkpoint not in ("best", "last"):
        raise InvalidInput("checkpoint must be best or last", [{"field": "checkpoint", "message": "best or last"}])
    version = context.kiln().registry.register_model(data["name"], data["job_id"], checkpoint=checkpoint,
                                                     build=serving().build_artifacts)
    return jsonify(version), 201


@bp.get("")
def list_models():
    """Every model with its versions, aliases and metrics."""
    return jsonify(context.kiln().list_models())


@bp.get("/<name>")
def get_model(name: str):
    """One model: versions (with metrics and source job) and aliases."""
    return jsonify(context.kiln().get_model(name))


@bp.put("/<name>/aliases/<alias>")
def set_alias(name: str, alias: str):
    """Point an alias (production, staging, ...) at a version; moving it is how a deploy happens."""
    data = _body({"version": ((int,), True)})
    return jsonify(context.kiln().set_alias(name, alias, data["version"]))
