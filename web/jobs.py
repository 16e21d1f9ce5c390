"""/v1/jobs: submit, list, inspect, cancel and retry jobs; read their logs, metrics and artifacts.

POST /v1/jobs and POST /v1/datasets take an ``Idempotency-Key`` header (``idempotent`` below,
worker.idempotency): the same key and body from the same caller get the first answer again.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import posixpath
import re
import select
import socket
import threading
import time
from typing import Callable

import yaml
from flask import Blueprint, Response, current_app, g, jsonify, request, url_for

from web.context import kiln, settings
from web.errors import too_large_message
from web.schemas import JOB_QUERY, LOG_QUERY, SUBMIT_QUERY, doc, parse_query, validate_job
from worker.errors import (BadRequest, InvalidInput, KilnError, PayloadTooLarge, TooManyRequests,
                           UnsupportedMediaType)
from worker.idempotency import HEADER as IDEMPOTENCY_HEADER, IdempotencyKeys, body_digest, check_key
from worker.storage import clean_path

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
log = logging.getLogger("kiln.web")

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
CHUNK = 256 * 1024
# Follow streams per web process: each holds a thread for its whole life (gunicorn gthread), so
# a few of them must never take every thread of a process (deploy/gunicorn.conf.py runs 16).
JOB_LINK = {"job_id": "$response.body#/id"}


def _check_media_type() -> bool:
    """True for a JSON body, False for YAML; 415 for anything else."""
    mimetype = request.mimetype or ""
    is_json = mimetype in JSON_TYPES or mimetype.endswith("+json")
    if not is_json and mimetype not in YAML_TYPES:
        raise UnsupportedMediaType(f"unsupported content type {mimetype or '(none)'}; send application/json "
                                   '{"kind": ..., "config": {...}} or an application/yaml config')
    return is_json


def _read_body(raw: bytes | None = None) -> object:
    """The request body decoded as JSON or YAML by its Content-Type; 400/415 say what is wrong."""
    is_json = _check_media_type()
    raw = _bounded_data() if raw is None else raw
    if not raw.strip():
        raise BadRequest("the request body is empty; send a job as JSON or YAML", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 text: {exc}", code="bad_encoding") from None
    if is_json:
        try:
            return json.loads(text, parse_constant=_no_constant)
        except RecursionError:
            raise BadRequest("malformed JSON: nested too deeply", code="invalid_json") from None
        except ValueError as exc:
            raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        raise BadRequest(f"malformed YAML: {exc}", code="invalid_yaml") from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, KeyError, OverflowError...
        # ... for scalars it tags but cannot build: 2001-02-30, !!float abc, !!bool maybe, 5000 digits
        raise BadRequest(f"malformed YAML: a value cannot be read ({type(exc).__name__}: {_first_line(exc)})",
                         code="invalid_yaml") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the YAML document must be a mapping, got {type(data).__name__}", code="invalid_yaml")
    # A YAML body is either a full {"kind", "config"[, "priority"]} document or a bare train config.
    return data if "config" in data and set(data) <= {"kind", "config", "priority"} \
        else {"kind": "train", "config": data}


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a config never needs them, and nested aliases ("billion
    laughs") would explode when an error message prints the value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in job configs",
                                              mark)
        return super().compose_node(parent, index)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "unreadable"


def _bounded_data() -> bytes:
    """The body, 413 beyond the endpoint's limit (web.errors.body_limit) even without a Content-Length."""
    raw = request.get_data(cache=False)  # a declared length over the limit is refused here
    limit = request.max_content_length
    # werkzeug's read() of a chunked body stops quietly at the limit: a body that reaches it is too long
    if limit is not None and request.content_length is None and len(raw) >= limit:
        raise PayloadTooLarge(too_large_message(limit))
    return raw


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def principal() -> str:
    """Who is calling: the token's id, or "anonymous" when auth is off."""
    token = g.get("kiln_token")
    return token["id"] if token else "anonymous"


def idempotent(endpoint: str, digest: Callable[[], str], answer: Callable[[], Response],
               location: Callable[[dict], str] | None = None) -> Response:
    """``answer()``, or with an Idempotency-Key header the first answer to the same key and body.

    400 for a malformed key; 409 for a key used with another body (``digest()``, sha256 of what the
    request sends) or still in progress. Only a 2xx answer is kept; after a failure the key is free."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return answer()
    check_key(key)
    keys = IdempotencyKeys(kiln().engine, settings().idempotency_ttl_s,
                           stale_after_s=max(900.0, settings().dataset_check_timeout_s + 60))
    who = principal()
    first = keys.begin(who, endpoint, key, digest())
    if first is not None:
        status, body = first
        resp = jsonify(body)
        resp.status_code = status
        resp.headers["Idempotent-Replayed"] = "true"
        if location is not None and isinstance(body, dict):
            resp.headers["Location"] = location(body)
        return resp
    try:
        resp = answer()
    except BaseException:
        keys.release(who, endpoint, key)
        raise
    if 200 <= resp.status_code < 300:
        keys.complete(who, endpoint, key, resp.status_code, resp.get_json())
    else:
        keys.release(who, endpoint, key)
    return resp


def _job_location(job: dict) -> str:
    return url_for("jobs.get_job", job_id=job["id"])


@bp.post("")
@doc(body={"application/json": "JobSubmission", "application/yaml": "JobYaml"},
     body_types=("application/json", "application/yaml"), query=SUBMIT_QUERY,
     responses={202: ("the queued job (Location: its URL); with an Idempotency-Key seen before, the first "
                      "answer again (Idempotent-Replayed: true)", "Job"),
                400: "malformed JSON or YAML, a bad ?priority= or Idempotency-Key",
                409: "the Idempotency-Key was used with another body, or its first request is still in progress",
                413: "body too large", 415: "unsupported content type",
                422: "invalid config or priority, one detail per field; or it names a dataset or model that "
                     "does not exist"},
     links={202: {"GetJob": ("jobs.get_job", JOB_LINK), "CancelJob": ("jobs.cancel", JOB_LINK),
                  "JobLogs": ("jobs.logs", JOB_LINK), "JobMetrics": ("jobs.metrics", JOB_LINK),
                  "JobArtifacts": ("jobs.artifacts", JOB_LINK)}})
def submit():
    """Validate a job config and queue it.

    ``priority`` (0-9, default 0; higher runs first, then first-come) comes from the body or, when the
    body gives none (a bare YAML config cannot), from ``?priority=``. An ``Idempotency-Key`` header
    makes a repeat of the same request (same body and content type, same caller) answer the first job
    instead of a new one.
    """
    _check_media_type()
    query = parse_query(SUBMIT_QUERY, request.args)  # 400 for a bad ?priority=, whatever the body
    raw = _bounded_data()

    def answer() -> Response:
        data = _read_body(raw)
        kind, config = validate_job(data)
        # the body's priority when it gives one (JSON, or a YAML document), else ?priority= (default 0)
        priority = int(data["priority"]) if isinstance(data, dict) and "priority" in data else query["priority"]
        job = kiln().submit_job(kind, config, priority=priority)
        resp = jsonify(job)
        resp.status_code = 202
        resp.headers["Location"] = _job_location(job)
        return resp

    digest = lambda: body_digest(request.mimetype or "", raw, request.args.get("priority", ""))  # noqa: E731
    return idempotent("POST /v1/jobs", digest, answer, _job_location)


@bp.get("")
@doc(query=JOB_QUERY, responses={200: ("a page of jobs, newest first", "JobPage"),
                                 400: "bad filter or pagination"})
def list_jobs():
    """List jobs, filtered by status, kind and parent (a sweep's trials), paginated by limit and offset."""
    q = parse_query(JOB_QUERY, request.args, max_limit=settings().page_size_max)
    return jsonify(kiln().list_jobs(status=q.get("status"), kind=q.get("kind"),
                                     limit=q["limit"], offset=q["offset"], parent=q.get("parent")))


@bp.get("/<job_id>")
@doc(responses={200: ("the job", "Job"), 404: "no such job"})
def get_job(job_id: str):
    """One job: state, progress, metrics, attempts, timestamps, error."""
    return jsonify(kiln().get_job(job_id))


@bp.post("/<job_id>/cancel")
@doc(responses={200: ("the job, cancelled or cancelling", "Job"), 404: "no such job", 409: "already finished"})
def cancel(job_id: str):
    """Cancel a job: a queued one at once, a running one at its next step boundary."""
    return jsonify(kiln().cancel_job(job_id))


@bp.post("/<job_id>/retry")
@doc(responses={200: ("the job, queued again in place (same id); it resumes from its last checkpoint", "Job"),
                404: "no such job", 409: "the job is queued, running or succeeded (only failed or cancelled "
                                         "jobs are retried)"})
def retry(job_id: str):
    """Retry a failed or cancelled job in place: queued again with fresh attempts, from its last checkpoint."""
    return jsonify(kiln().retry_job(job_id))


@bp.get("/<job_id>/logs")
@doc(query=LOG_QUERY, responses={200: ("the log from the offset (X-Next-Offset gives the next one); "
                                      "with follow, a stream", {"type": "string"}, "text/plain"),
                                 400: "bad offset", 404: "no such job",
                                 429: "too many follow streams open on this web process (Retry-After)"})
def logs(job_id: str):
    """The job's log from byte ``offset``; ``follow=1`` streams until the job ends and the log is drained.

    Each open follow stream holds a web thread, so a process serves a few at a time (429 beyond);
    a stream ends after Settings.log_follow_max_s (the client reconnects at offset + bytes read) or as soon
    as its client has gone.
    """
    q = parse_query(LOG_QUERY, request.args)
    facade = kiln()
    data, next_offset, finished = facade.read_log(job_id, offset=q["offset"])  # 404 before any streaming
    if not q["follow"]:
        resp = Response(data, mimetype="text/plain")
        resp.headers["X-Next-Offset"] = str(next_offset)
        resp.headers["X-Job-Finished"] = "true" if finished else "false"
        return resp
    release = follow_slots().acquire()
    try:
        s = settings()
        poll, max_s = min(max(s.log_poll_s, 0.05), 5.0), s.log_follow_max_s
        sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
        stream = _follow(facade, job_id, data, next_offset, finished, poll, max_s, lambda: client_gone(sock))
        resp = Response(stream, mimetype="text/plain")
        resp.call_on_close(release)  # runs when the server closes the response, however it ended
    except BaseException:
        release()
        raise
    resp.headers["X-Accel-Buffering"] = "no"  # let nginx pass chunks through as they come
    return resp


class FollowSlots:
    """How many follow streams this process serves at once; ``acquire`` answers 429 when all are taken."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self.open >= self.limit:
                raise TooManyRequests(f"{self.open} log streams are open on this web process (the limit is "
                                      f"{self.limit}); read the log with ?offset=N polling, or retry later",
                                      {"limit": self.limit}, code="too_many_streams")
            self.open += 1
        done = []

        def release():
            with self._lock:
                if not done:  # once, whoever calls first (the response's close or an error path)
                    done.append(True)
                    self.open -= 1
        return release


def follow_slots() -> FollowSlots:
    """The app's FollowSlots (Settings.log_follow_streams per web process)."""
    app = current_app._get_current_object()
    slots = app.extensions.get("kiln.follow")
    if slots is None:
        slots = app.extensions["kiln.follow"] = FollowSlots(max(1, settings(app).log_follow_streams))
    return slots


def client_gone(sock) -> bool:
    """Whether the peer of ``sock`` has closed its end (a read would return EOF); False if unknown."""
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0):
            return False  # nothing to read: the client is quietly waiting
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True  # reset, or the server closed it already


def _follow(facade, job_id, data, offset, finished, poll_s, max_s, gone=lambda: False):
    """Yield log chunks until the job is finished and a read comes back empty, max_s passes, or the
    client has gone (checked while the log is quiet, where no write would notice it)."""
    deadline = time.monotonic() + max_s
    yield b""  # the server sends the headers now, not at the first log line of a quiet job
    while True:
        if data:
            yield data
        elif finished or time.monotonic() >= deadline or gone():
            return
        else:
            time.sleep(poll_s)
        try:
            data, offset, finished = facade.read_log(job_id, offset=offset)
        except KilnError as exc:  # the headers are gone: end the stream, say why in the log text
            yield f"\n[kiln] log stream ended: {exc.message}\n".encode()
            return
        except Exception as exc:  # noqa: BLE001 - a store or storage outage mid-stream: same, without raw text
            log.warning("log stream of %s ended: %s", job_id, exc)
            yield b"\n[kiln] log stream ended: a dependency is unavailable; reconnect at the last offset\n"
            return


@bp.get("/<job_id>/metrics")
@doc(responses={200: ("per-epoch rows and series by metric name", "JobMetrics"), 404: "no such job"})
def metrics(job_id: str):
    """Per-epoch metric series (train/val loss, accuracy, lr, grad norm)."""
    return jsonify(kiln().job_metrics(job_id))


@bp.get("/<job_id>/artifacts")
@doc(responses={200: ("artifacts with name, size and sha256", "Artifacts"), 404: "no such job"})
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
@doc(responses={200: ("the file", {"type": "string", "format": "binary"}, "*/*"),
                400: "path escapes the job folder", 404: "no such job or file"})
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
