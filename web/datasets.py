"""/v1/datasets: upload a zip in ImageFolder layout, list and inspect uploaded datasets.

An upload may carry an ``Idempotency-Key`` (web.jobs.idempotent): what must match is the dataset the
request describes, the zip's bytes and its name, not the raw body, whose multipart boundary differs
on every send of the same file.
"""
from __future__ import annotations

import hashlib
import tempfile

from flask import Blueprint, jsonify, request, url_for

from web.context import kiln, settings
from web.jobs import idempotent
from web.schemas import DATASET_NAME, DATASET_QUERY, doc, parse_query, validate
from worker.idempotency import HEADER as IDEMPOTENCY_HEADER, body_digest
from worker.zipcheck import upload_slots
from worker.errors import BadRequest, UnsupportedMediaType

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")
CHUNK = 1 << 20


def _upload():
    """(fileobj, filename, name) from a multipart ``file`` field or a raw zip body; the name from the
    multipart ``name`` field, else ?name= (each checked against the same pattern when present)."""
    mimetype = request.mimetype or ""
    query = parse_query(DATASET_QUERY, request.args)  # 400 for a bad ?name=, whatever the body
    if mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise BadRequest("multipart body has no `file` field; send file=@data.zip", code="missing_file")
        name = query.get("name")
        if "name" in request.form:
            name = validate({"type": "object", "properties": {"name": DATASET_NAME}},
                            {"name": request.form["name"]}, "name")["name"]
        return upload.stream, upload.filename or "upload.zip", name
    if mimetype in ZIP_TYPES:
        return request.stream, "upload.zip", query.get("name")
    raise UnsupportedMediaType(f"unsupported content type {mimetype or '(none)'}; "
                               "send multipart/form-data with a `file` field holding a zip")


@bp.post("")
@doc(body={"multipart/form-data": "DatasetUpload", "application/zip": "ZipBody"},
     body_types=("multipart/form-data", "application/zip"), query=DATASET_QUERY,
     responses={201: ("the stored dataset: id, name, classes, counts, num_images, size", "Dataset"),
                400: "no file, or a bad Idempotency-Key",
                409: "the Idempotency-Key was used with another dataset, or its first request is still in progress",
                413: "body too large, or too slow to check", 415: "not multipart",
                422: "not a zip, unsafe or oversize entries, undecodable images, fewer than 2 classes",
                429: "this web process is checking as many uploads as it may (Retry-After)"},
     links={201: {"GetDataset": ("datasets.get_dataset", {"dataset_id": "$response.body#/id"})}})
def create():
    """Check an ImageFolder zip entry by entry, then store it atomically.

    The checks (inflate with a byte budget, decode every image) run on a small per-process pool
    with a time limit; a busy process answers 429 before reading the body.
    """
    with upload_slots(settings()).slot():
        fileobj, filename, name = _upload()
        if IDEMPOTENCY_HEADER not in request.headers:
            return _stored(kiln().create_dataset(fileobj, filename, name=name))
        with tempfile.TemporaryFile(dir=_spool_dir()) as spool:
            digest = hashlib.sha256()
            while block := fileobj.read(CHUNK):  # the body's limit still applies (413)
                digest.update(block)
                spool.write(block)
            spool.seek(0)
            return idempotent("POST /v1/datasets", lambda: body_digest(digest.hexdigest(), name or "", filename),
                              lambda: _stored(kiln().create_dataset(spool, filename, name=name)), _location)


def _spool_dir() -> str:
    path = settings().cache_path / "incoming"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _location(dataset: dict) -> str:
    return url_for("datasets.get_dataset", dataset_id=dataset["id"])


def _stored(dataset: dict):
    resp = jsonify(dataset)
    resp.status_code = 201
    resp.headers["Location"] = _location(dataset)
    return resp


@bp.get("")
@doc(responses={200: ("every uploaded dataset, newest first", "DatasetList")})
def list_datasets():
    """Every uploaded dataset."""
    return jsonify({"datasets": kiln().list_datasets()})


@bp.get("/<dataset_id>")
@doc(responses={200: ("the dataset", "Dataset"), 404: "no such dataset"})
def get_dataset(dataset_id: str):
    """One uploaded dataset: classes, per-class counts, size."""
    return jsonify(kiln().get_dataset(dataset_id))
