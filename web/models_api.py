"""/v1/models: register a finished job's checkpoint as a model version, list, move aliases.

Registering builds the version's artifacts in the forward process (web/serving/), not in this one.
Bodies are read with ``request.get_json()`` (web/errors: 400 for malformed or too deeply nested
JSON, 415 for another content type), then checked by web.schemas and by the registry, which
checks names, ids and version bounds before any query.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from web.context import kiln
from web.schemas import ALIAS, MODEL_REGISTRATION, doc, validate
from web.serving.web_app import serving

bp = Blueprint("models_api", __name__, url_prefix="/v1/models")


@bp.post("")
@doc(body="ModelRegistration", responses={201: "the new model version", 400: "malformed JSON",
                                          404: "no such job or checkpoint",
                                          409: "the job is not a succeeded training job",
                                          415: "the body is not application/json",
                                          422: "invalid body, one detail per field",
                                          503: "the forward process that builds the artifacts is restarting"})
def register():
    """Register a succeeded job's best (or last) checkpoint as the next version of a model."""
    data = validate(MODEL_REGISTRATION, request.get_json())
    version = kiln().registry.register_model(data["name"], data["job_id"], checkpoint=data["checkpoint"],
                                             build=serving().build_artifacts)
    return jsonify(version), 201


@bp.get("")
@doc(responses={200: "every model with its versions and aliases"})
def list_models():
    """Every model with its versions, aliases and metrics."""
    return jsonify(kiln().list_models())


@bp.get("/<name>")
@doc(responses={200: "the model", 404: "no such model"})
def get_model(name: str):
    """One model: versions (with metrics and source job) and aliases."""
    return jsonify(kiln().get_model(name))


@bp.put("/<name>/aliases/<alias>")
@doc(body="Alias", responses={200: "the model with its aliases", 400: "malformed JSON",
                              404: "no such model or version", 415: "the body is not application/json",
                              422: "invalid body, alias name or version (1..999999999)"})
def set_alias(name: str, alias: str):
    """Point an alias (production, staging, ...) at a version; moving it is how a deploy happens."""
    data = validate(ALIAS, request.get_json())
    return jsonify(kiln().set_alias(name, alias, data["version"]))
