"""/v1/datasets: upload a zip in ImageFolder layout, list and inspect uploaded datasets."""
from __future__ import annotations

from flask import Blueprint, jsonify, request, url_for

from web.context import kiln
from web.schemas import DATASET_NAME, doc, validate
from worker.errors import BadRequest, UnsupportedMediaType

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")


def _upload():
    """(fileobj, filename, name) from a multipart ``file`` field or a raw zip body (?name=)."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise BadRequest("multipart body has no `file` field; send file=@data.zip", code="missing_file")
        return upload.stream, upload.filename or "upload.zip", request.form.get("name") or None
    if mimetype in ZIP_TYPES:
        return request.stream, "upload.zip", request.args.get("name") or None
    raise UnsupportedMediaType(f"unsupported content type {mimetype or '(none)'}; "
                               "send multipart/form-data with a `file` field holding a zip")


@bp.post("")
@doc(body="DatasetUpload", body_types=("multipart/form-data", "application/zip"),
     responses={201: "the stored dataset: id, name, classes, counts, num_images, size",
                400: "no file", 413: "body too large", 415: "not multipart",
                422: "not a zip, unsafe or oversize entries, undecodable images, fewer than 2 classes"})
def create():
    """Check an ImageFolder zip entry by entry, then store it atomically."""
    fileobj, filename, name = _upload()
    if name is not None:
        name = validate({"type": "object", "properties": {"name": DATASET_NAME}}, {"name": name}, "name")["name"]
    dataset = kiln().create_dataset(fileobj, filename, name=name)
    resp = jsonify(dataset)
    resp.status_code = 201
    resp.headers["Location"] = url_for("datasets.get_dataset", dataset_id=dataset["id"])
    return resp


@bp.get("")
@doc(responses={200: "every uploaded dataset, newest first"})
def list_datasets():
    """Every uploaded dataset."""
    return jsonify({"datasets": kiln().list_datasets()})


@bp.get("/<dataset_id>")
@doc(responses={200: "the dataset", 404: "no such dataset"})
def get_dataset(dataset_id: str):
    """One uploaded dataset: classes, per-class counts, size."""
    return jsonify(kiln().get_dataset(dataset_id))
