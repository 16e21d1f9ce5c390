"""/v1/jobs: submit, list, inspect and cancel jobs; read their logs, metrics and artifacts."""
from __future__ import annotations

import json
import mimetypes
import posixpath
import re
import time

import yaml
from flask import Blueprint, Response, current_app, jsonify, request, url_for

from web.context import kiln, settings
from web.errors import too_large_message
from web.schemas import JOB_QUERY, LOG_QUERY, doc, parse_query, validate_job
from worker.errors import BadRequest, InvalidInput, KilnError, PayloadTooLarge, UnsupportedMediaType
from worker.storage import clean_path

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
CHUNK = 256 * 1024


def _read_body() -> object:
    """The request body decoded as JSON or YAML by its Content-Type; 400/415 say what is wrong."""
    mimetype = request.mimetype or ""
    is_json = mimetype in JSON_TYPES or mimetype.endswith("+json")
    if not is_json and mimetype not in YAML_TYPES:
        raise UnsupportedMediaType(f"unsupported content type {mimetype or '(none)'}; send application/json "
                                   '{"kind": ..., "config": {...}} or an application/yaml config')
    raw = _bounded_data()
    if not raw.strip():
        raise BadRequest("the request body is empty; send a job as JSON or YAML", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 text: {exc}", code="bad_encoding") from None
    if is_json:
        try:
            return json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        raise BadRequest(f"malformed YAML: {exc}", code="invalid_yaml") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the YAML document must be a mapping, got {type(data).__name__}", code="invalid_yaml")
    # A YAML body is either a full {"kind", "config"} document or a bare train config.
    return data if "config" in data and set(data) <= {"kind", "config"} else {"kind": "train", "config": data}


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a config never needs them, and nested aliases ("billion
    laughs") would explode when an error message prints the value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in job configs",
                                              mark)
        return super().compose_node(parent, index)


def _bounded_data() -> bytes:
    """The body, 413 beyond MAX_CONTENT_LENGTH even without a Content-Length header."""
    raw = request.get_data(cache=False)  # a declared length over the limit is refused here
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    # werkzeug's read() of a chunked body stops quietly at the limit: a body that reaches it is too long
    if limit is not None and request.content_length is None and len(raw) >= limit:
        raise PayloadTooLarge(too_large_message(limit))
    return raw


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


@bp.post("")
@doc(body="JobSubmission", body_types=("application/json", "application/yaml"),
     responses={202: "the queued job (Location: its URL)", 400: "malformed JSON or YAML",
                413: "body too large", 415: "unsupported content type", 422: "invalid config, one detail per field"})
def submit():
    """Validate a job config and queue it."""
    kind, config = validate_job(_read_body())
    job = kiln().submit_job(kind, config)
    resp = jsonify(job)
    resp.status_code = 202
    resp.headers["Location"] = url_for("jobs.get_job", job_id=job["id"])
    return resp


@bp.get("")
@doc(query=JOB_QUERY, responses={200: "a page of jobs, newest first", 400: "bad filter or pagination"})
def list_jobs():
    """List jobs, filtered by status and kind, paginated by limit and offset."""
    q = parse_query(JOB_QUERY, request.args, max_limit=settings().page_size_max)
    return jsonify(kiln().list_jobs(status=q.get("status"), kind=q.get("kind"),
                                     limit=q["limit"], offset=q["offset"]))


@bp.get("/<job_id>")
@doc(responses={200: "the job", 404: "no such job"})
def get_job(job_id: str):
    """One job: state, progress, metrics, attempts, timestamps, error."""
    return jsonify(kiln().get_job(job_id))


@bp.post("/<job_id>/cancel")
@doc(responses={200: "the job, cancelled or cancelling", 404: "no such job", 409: "already finished"})
def cancel(job_id: str):
    """Cancel a job: a queued one at once, a running one at its next step boundary."""
    return jsonify(kiln().cancel_job(job_id))


@bp.get("/<job_id>/logs")
@doc(query=LOG_QUERY, responses={200: "text/plain log from the offset; X-Next-Offset gives the next one",
                                 400: "bad offset", 404: "no such job"})
def logs(job_id: str):
    """The job's log from byte ``offset``; ``follow=1`` streams until the job ends and the log is drained."""
    q = parse_query(LOG_QUERY, request.args)
    facade = kiln()
    data, next_offset, finished = facade.read_log(job_id, offset=q["offset"])  # 404 before any streaming
    if not q["follow"]:
        resp = Response(data, mimetype="text/plain")
        resp.headers["X-Next-Offset"] = str(next_offset)
        resp.headers["X-Job-Finished"] = "true" if finished else "false"
        return resp
    poll = min(max(float(current_app.config.get("KILN_LOG_POLL_S", 0.5)), 0.05), 5.0)
    max_s = float(current_app.config.get("KILN_LOG_FOLLOW_MAX_S", 600.0))
    resp = Response(_follow(facade, job_id, data, next_offset, finished, poll, max_s), mimetype="text/plain")
    resp.headers["X-Accel-Buffering"] = "no"  # let nginx pass chunks through as they come
    return resp


def _follow(facade, job_id, data, offset, finished, poll_s, max_s):
    """Yield log chunks until the job is finished and a read comes back empty, or max_s passes."""
    deadline = time.monotonic() + max_s
    while True:
        if data:
            yield data
        elif finished or time.monotonic() >= deadline:
            return
        else:
            time.sleep(poll_s)
        try:
            data, offset, finished = facade.read_log(job_id, offset=offset)
        except KilnError as exc:  # the headers are gone: end the stream, say why in the log text
            yield f"\n[kiln] log stream ended: {exc.message}\n".encode()
            return


@bp.get("/<job_id>/metrics")
@doc(responses={200: "per-epoch rows and series by metric name", 404: "no such job"})
def metrics(job_id: str):
    """Per-epoch metric series (train/val loss, accuracy, lr, grad norm)."""
    return jsonify(kiln().job_metrics(job_id))


@bp.get("/<job_id>/artifacts")
@doc(responses={200: "artifacts with name, size and sha256", 404: "no such job"})
def artifacts(job_id: str):
    """Everything the job stored: name, size, sha256."""
    return jsonify({"artifacts": kiln().list_artifacts(job_id)})


def safe_artifact_name(name: str) -> str:
    """A relative POSIX path inside the job folder, or BadRequest (no .., absolute paths, NUL, empty segments)."""
    try:
        clean = clean_path(name)
    except InvalidInput:
        clean = None
    if not clean or clean != name:
        raise BadRequest(f"artifact path {name!r} must be relative, inside the job folder, without '..' "
                         "or empty segments (e.g. checkpoints/best.pt)", code="invalid_path")
    return clean


@bp.get("/<job_id>/artifacts/<path:name>")
@doc(responses={200: "the file", 400: "path escapes the job folder", 404: "no such job or file"})
def download(job_id: str, name: str):
    """Download one artifact (streamed, with Content-Length)."""
    fileobj, size = kiln().open_artifact(job_id, safe_artifact_name(name))

    def chunks():
        try:
            while block := fileobj.read(CHUNK):
                yield block
        finally:
            fileobj.close()

    mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    resp = Response(chunks(), mimetype=mimetype, direct_passthrough=True)
    resp.headers["Content-Length"] = str(size)
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(name))  # header-safe
    resp.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return resp
