"""DELETE /v1/jobs/<id>, /v1/datasets/<id>, /v1/models/<name>/versions/<v>: rows and stored objects.

The rules (what is refused with 409, what goes with what) live in worker.retention. A deleted model
version also stops being served by this web process at once (its other processes find it gone within
Settings.model_refresh_s: web.serving.web_models re-resolves every ref).
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from configs.names import MAX_VERSION
from web.context import kiln, settings
from web.schemas import doc
from web.serving.web_app import EXTENSION
from worker import retention
from worker.errors import NotFound

bp = Blueprint("retention", __name__)

_COUNT = {"type": "integer", "minimum": 0, "description": "stored objects removed"}
DELETED_JOB = {"type": "object", "required": ["id", "deleted", "jobs", "objects"], "properties": {
    "id": {"type": "string"}, "deleted": {"const": True}, "objects": _COUNT,
    "jobs": {"type": "array", "items": {"type": "string"}, "description": "the job and, for a sweep, its trials"}}}
DELETED_DATASET = {"type": "object", "required": ["id", "deleted", "objects"], "properties": {
    "id": {"type": "string"}, "deleted": {"const": True}, "objects": _COUNT}}
DELETED_VERSION = {"type": "object", "required": ["name", "version", "deleted", "objects"], "properties": {
    "name": {"type": "string"}, "version": {"type": "integer"}, "deleted": {"const": True}, "objects": _COUNT}}
VERSION = {"type": "integer", "minimum": 1, "maximum": MAX_VERSION, "description": "a model version"}


@bp.delete("/v1/jobs/<job_id>")
@doc(responses={200: ("what was deleted", DELETED_JOB), 404: "no such job",
                409: "the job (or one of a sweep's trials) is queued or running: cancel it first"})
def delete_job(job_id: str):
    """Delete a finished job: its row, events and every stored object (logs, metrics, checkpoints).

    A queued or running job is refused (409): cancel it first. Model versions registered from the job
    stay (they hold their own copy of the weights); a sweep's finished trials are deleted with it.
    """
    k = kiln()
    return jsonify(retention.delete_job(k.engine, k.storage, job_id))


@bp.delete("/v1/datasets/<dataset_id>")
@doc(responses={200: ("what was deleted", DELETED_DATASET), 404: "no such dataset",
                409: "a queued or running job uses the dataset (details.jobs)"})
def delete_dataset(dataset_id: str):
    """Delete an uploaded dataset's row and files; refused (409) while a queued or running job uses it."""
    k = kiln()
    return jsonify(retention.delete_dataset(k.engine, k.storage, dataset_id))


@bp.delete("/v1/models/<name>/versions/<version>")
@doc(path={"version": VERSION}, responses={
    200: ("what was deleted", DELETED_VERSION), 404: "no such model or version",
    409: "an alias points at the version (details.aliases), or a queued or running predict job names it"})
def delete_model_version(name: str, version: str):
    """Delete a model version's row and files; refused (409) while an alias points at it.

    Its number is never given to a later version of the model.
    """
    number = int(version) if version.isascii() and version.isdigit() and len(version) <= 9 else 0
    if not 1 <= number <= MAX_VERSION:
        raise NotFound(f"model {name!r} has no version {version!r}: versions are 1..{MAX_VERSION}")
    k = kiln()
    out = retention.delete_model_version(k.engine, k.storage, name, number, cache_dir=settings().cache_path)
    state = current_app.extensions.get(EXTENSION)
    if state is not None:
        state.models.forget(name, number)
    return jsonify(out)
