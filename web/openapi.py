"""/openapi.json (OpenAPI 3.1) generated from the app's url_map and the request schemas; /docs is Swagger UI.

Every registered route appears (static files aside): views decorated with
``web.schemas.doc`` contribute their body, query, path parameters, responses and
links; views of blueprints that don't use ``doc`` get the facts in EXTRA. The answers
every route can give are added from the rules that produce them: 400 (NUL in the URL,
bad query), 413 (each body's limit), 401/403/503 on routes behind a token, 503 where
the store is read. /docs serves Swagger UI from the swagger-ui-bundle wheel (no CDN);
Swagger UI 4 reads OpenAPI 3.0 only, so it is handed ``as_openapi_30`` of the same document.
"""
from __future__ import annotations

import swagger_ui_bundle
from flask import Blueprint, current_app, jsonify, render_template, url_for
from werkzeug.routing import IntegerConverter, PathConverter

from configs.names import ID_RE, JOB_KINDS, JOB_STATES
from web import schemas
from web.auth import ENDPOINT_SCOPES, required_scope
from web.context import settings as app_settings

bp = Blueprint("openapi", __name__, static_folder=swagger_ui_bundle.swagger_ui_path,
               static_url_path="/docs/swagger-ui")
HIDDEN_METHODS = {"HEAD", "OPTIONS"}
REF = "#/components/schemas/"
# Facts for views of other blueprints, keyed by endpoint: defaults under what their own doc() says.
IMAGE = {"type": "string", "format": "binary"}
EXTRA = {
    "predict.predict": {
        "body_types": ("multipart/form-data", "image/*", "application/json"),
        "body_schemas": {
            "multipart/form-data": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "array", "items": IMAGE, "minItems": 1,
                          "description": "one part per image (PNG, JPEG, BMP, PPM/PGM, TIFF or WebP)"}}},
            "image/*": {**IMAGE, "description": "one encoded image"},
            "application/json": {"type": "object", "required": ["instances"], "properties": {"instances": {
                "type": "array", "minItems": 1, "items": {"anyOf": [
                    {"type": "string", "description": "a base64 image (a data: URL too)"},
                    {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string"}}},
                    {"type": "array", "description": "pixels 0..255 as [H][W] or [H][W][C]"}]}}}}},
        "query": schemas.PREDICT_QUERY,
        "responses": {200: "model name, version and runtime, one prediction per input",
                      400: "no model given, no image part, or a malformed body", 404: "no such model",
                      413: "over the body limit or the request's pixel budget", 415: "unsupported content type",
                      422: "an input that is not an image Kiln reads, or too many inputs",
                      503: "the model's queue is full (queue_full, Retry-After: 1), or the forward process is "
                           "busy, restarting or too slow (Retry-After)"}},
    "models_api.register": {"links": {201: {
        "GetModel": ("models_api.get_model", {"name": "$response.body#/name"}),
        "SetAlias": ("models_api.set_alias", {"name": "$response.body#/name"})}}},
}
# Request headers an operation reads, by endpoint.
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                   "description": "1-255 visible ASCII characters: a repeat with the same key and body (same caller, "
                                  "within KILN_IDEMPOTENCY_TTL_S) answers the first answer again; another body is 409"}
HEADERS = {"jobs.submit": [IDEMPOTENCY_KEY], "datasets.create": [IDEMPOTENCY_KEY]}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer", "minimum": 0}}}
GENERIC = {400: "malformed request: a NUL byte in the URL, a bad query parameter or body",
           401: "no token, or an unknown, expired or revoked one (WWW-Authenticate: Bearer)",
           403: "the token lacks the scope this operation needs",
           413: "the body is over this operation's limit",
           429: "too many requests of this kind at once (Retry-After)",
           503: "a dependency (store, broker, storage) is unavailable (Retry-After names no host; "
                "details.dependency names which)"}


def openapi_path(rule: str) -> str:
    """'/v1/jobs/<job_id>/artifacts/<path:name>' -> '/v1/jobs/{job_id}/artifacts/{name}'."""
    import re

    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


PROMOTION = {"type": "object", "required": ["promoted", "reason"],
             "description": "config.register's outcome: a new model version, or why not",
             "properties": {"promoted": {"type": "boolean"}, "reason": {"type": "string"},
                            "name": {"type": "string"}, "version": {"type": "integer"},
                            "alias": {"type": ["string", "null"]}, "metrics": {"type": "object"}}}
STOPPED = {"type": "object", "required": ["by", "epoch", "reason"],
           "description": "a sweep's trial stopped early by successive halving",
           "properties": {"by": {"const": "successive_halving"}, "epoch": {"type": "integer"},
                          "metric": {"type": "number"}, "cutoff": {"type": "number"}, "reason": {"type": "string"}}}
TRIAL = {"type": "object", "required": ["id", "index", "status", "values", "metric", "stopped"],
         "properties": {"id": {"type": "string", "pattern": ID_RE}, "index": {"type": "integer", "minimum": 1},
                        "status": {"enum": list(JOB_STATES)},
                        "values": {"type": "object", "description": "the values this trial drew, by dotted field"},
                        "metric": {"type": ["number", "null"]}, "epoch": {"type": ["integer", "null"]},
                        "rungs": {"type": "object", "description": "epoch -> the metric recorded at that rung"},
                        "stopped": {"type": "boolean"}, "stop_reason": {"type": ["string", "null"]}}}
SWEEP = {"type": "object", "description": "kind sweep only: its trials and the best trial (worker.sweeps.summary)",
         "required": ["total", "counts", "trials", "best"],
         "properties": {"method": {"enum": ["random", "grid"]}, "metric": {"type": "string"},
                        "mode": {"enum": ["max", "min"]}, "space": {"type": "object"},
                        "halving": {"type": ["object", "null"]}, "total": {"type": "integer"},
                        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "trials": {"type": "array", "items": TRIAL},
                        "best": {"anyOf": [{"type": "null"}, {
                            "type": "object", "required": ["id", "values", "metric", "config"],
                            "properties": {"id": {"type": "string", "pattern": ID_RE}, "index": {"type": "integer"},
                                           "values": {"type": "object"}, "metric": {"type": "number"},
                                           "config": {"type": "object"}}}]}}}


def response_components() -> dict:
    """Schemas of the answers of jobs, datasets, tokens and health (the resources this tier shapes)."""
    ts, nts = {"type": "string"}, _nullable({"type": "string"})
    num = {"type": ["number", "null"]}
    job = {"type": "object", "required": ["id", "kind", "status", "attempts", "progress", "metrics", "config",
                                          "error", "created_at"],
           "properties": {"id": {"type": "string", "pattern": ID_RE}, "kind": {"enum": list(JOB_KINDS)},
                          "status": {"enum": list(JOB_STATES)}, "attempts": {"type": "integer", "minimum": 0},
                          "max_attempts": {"type": "integer"},
                          "progress": {"type": "object", "properties": {k: num for k in (
                              "epoch", "epochs", "step", "total_steps", "percent", "eta_s")}},
                          "metrics": {"type": "object", "required": ["latest", "best"],
                                      "properties": {"latest": {"type": "object"}, "best": {"type": "object"}}},
                          "config": {"type": "object"}, "error": nts, "worker": nts,
                          "world_size": {"type": "integer", "minimum": 1},
                          "cancel_requested": {"type": "boolean"},
                          "queue": {"type": "object", "required": ["position", "reason"], "properties": {
                              "position": {"type": ["integer", "null"], "minimum": 1,
                                           "description": "a queued job's place: 1 runs next; null unless queued"},
                              "reason": {"type": ["string", "null"],
                                         "description": "why a queued job waits; null unless queued"}}},
                          "priority": {k: schemas.PRIORITY[k] for k in ("type", "minimum", "maximum")},
                          "parent": {**nts, "description": "the sweep this trial belongs to"},
                          "promotion": _nullable(PROMOTION), "stopped": _nullable(STOPPED),
                          "sweep": SWEEP,
                          "created_at": ts, "started_at": nts,
                          "finished_at": nts, "updated_at": nts}}
    dataset = {"type": "object", "required": ["id", "name", "classes", "counts", "num_images", "size", "created_at"],
               "properties": {"id": {"type": "string", "pattern": ID_RE}, "name": ts,
                              "classes": {"type": "array", "items": ts},
                              "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                              "num_images": {"type": "integer"}, "size": {"type": "integer"}, "created_at": ts}}
    token = {"type": "object", "required": ["id", "name", "scopes", "created_at", "expires_at", "last_used_at",
                                            "revoked_at"],
             "properties": {"id": {"type": "string", "pattern": ID_RE}, "name": ts,
                            "scopes": {"type": "array", "items": schemas.SCOPE}, "created_at": ts,
                            "expires_at": nts, "last_used_at": nts, "revoked_at": nts}}
    return {
        "Job": job,
        "JobPage": {"type": "object", "required": ["jobs", "total", "limit", "offset"],
                    "properties": {"jobs": {"type": "array", "items": {"$ref": REF + "Job"}},
                                   "total": {"type": "integer"}, "limit": {"type": "integer"},
                                   "offset": {"type": "integer"}}},
        "JobMetrics": {"type": "object", "required": ["epochs", "series"],
                       "properties": {"epochs": {"type": "array", "items": {"type": "object"}},
                                      "series": {"type": "object"}}},
        "Artifacts": {"type": "object", "required": ["artifacts"], "properties": {"artifacts": {
            "type": "array", "items": {"type": "object", "required": ["name", "size"],
                                       "properties": {"name": ts, "size": {"type": "integer"},
                                                      "sha256": nts}}}}},
        "Dataset": dataset,
        "DatasetList": {"type": "object", "required": ["datasets"],
                        "properties": {"datasets": {"type": "array", "items": {"$ref": REF + "Dataset"}}}},
        "Token": token,
        "TokenCreated": {"allOf": [{"$ref": REF + "Token"}, {
            "type": "object", "required": ["token"],
            "properties": {"token": {"type": "string", "description": "the secret, shown only in this answer"}}}]},
        "TokenList": {"type": "object", "required": ["tokens"],
                      "properties": {"tokens": {"type": "array", "items": {"$ref": REF + "Token"}}}},
        "Worker": {"type": "object", "required": ["name", "gpus", "free_gpus", "slots", "live", "heartbeat_at"],
                   "properties": {"name": ts, "hostname": nts, "gpus": {"type": "integer", "minimum": 0},
                                  "free_gpus": {"type": "integer", "minimum": 0},
                                  "slots": {"type": "integer", "minimum": 0}, "info": {"type": "object"},
                                  "started_at": nts, "heartbeat_at": nts, "live": {"type": "boolean"}}},
        "WorkerList": {"type": "object", "required": ["workers"],
                       "properties": {"workers": {"type": "array", "items": {"$ref": REF + "Worker"}}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "Ready": {"type": "object", "required": ["status", "checks"],
                  "properties": {"status": {"const": "ok"}, "checks": {"type": "object"}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message", "details"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}}},
    }


def _facts(app, rule) -> dict:
    """The view's doc() facts over EXTRA's (an empty value in doc() leaves EXTRA's in place)."""
    facts = dict(EXTRA.get(rule.endpoint, {}))
    for key, value in getattr(app.view_functions[rule.endpoint], "openapi", {}).items():
        if value or key not in facts:
            facts[key] = value
    return facts


def _path_params(rule, facts: dict) -> list[dict]:
    out = []
    for arg in sorted(rule.arguments):
        converter = rule._converters.get(arg)
        if arg in facts.get("path", {}):
            schema = facts["path"][arg]
        elif isinstance(converter, IntegerConverter):
            schema = {"type": "integer", "minimum": 0}
        elif isinstance(converter, PathConverter):
            schema = schemas.ARTIFACT_PATH
        else:
            schema = schemas.PATH_PARAMS.get(arg, {"type": "string"})
        out.append({"name": arg, "in": "path", "required": True, "schema": schema,
                    "description": schema.get("description", "")})
    return out


def _response(code: int, spec) -> dict:
    if isinstance(spec, tuple):
        text, schema, media = (*spec, "application/json")[:3]
    else:
        text, schema, media = spec, None, "application/json"
    out: dict = {"description": text}
    if code >= 400:
        schema, media = "Error", "application/json"
    if schema is not None:
        out["content"] = {media: {"schema": {"$ref": REF + schema} if isinstance(schema, str) else schema}}
    if code in (429, 503):
        out["headers"] = RETRY_AFTER
    if code == 401:
        out["headers"] = {"WWW-Authenticate": {"description": "Bearer realm=\"kiln\"", "required": True,
                                               "schema": {"type": "string"}}}
    return out


def _operation(app, rule, method: str, op_ids: dict) -> dict:
    facts = _facts(app, rule)
    doc = (app.view_functions[rule.endpoint].__doc__ or rule.endpoint).strip().splitlines()
    settings = app_settings(app)
    op: dict = {"operationId": op_ids[(rule.endpoint, method)], "summary": doc[0],
                "tags": [rule.endpoint.split(".")[0]]}
    if len(doc) > 1:
        op["description"] = " ".join(line.strip() for line in doc[1:]).strip()
    params = _path_params(rule, facts)
    for name, sub in (facts.get("query") or {}).get("properties", {}).items():
        if name == "limit":
            sub = {**sub, "maximum": settings.page_size_max}  # what parse_query enforces
        # /predict's model may be left out only when the service has a default model
        required = rule.endpoint == "predict.predict" and name == "model" and not settings.default_model
        params.append({"name": name, "in": "query", "required": required, "schema": sub,
                       "description": sub.get("description", "")})
    params += HEADERS.get(rule.endpoint, [])
    if params:
        op["parameters"] = params
    responses = dict(facts.get("responses", {}))
    has_body = method in ("POST", "PUT", "PATCH")
    if has_body and (facts.get("body") or facts.get("body_schemas")):
        body = facts.get("body")
        content = {}
        for media in facts.get("body_types", ("application/json",)):
            name = body.get(media) if isinstance(body, dict) else body
            content[media] = {"schema": {"$ref": REF + name} if name else facts["body_schemas"][media]}
        op["requestBody"] = {"required": True, "content": content}
    extra = [400]
    if has_body:
        extra.append(413)
    scope = required_scope(rule.endpoint, rule.rule, settings) if settings.auth_enabled else None
    if scope is not None:
        op["security"] = [{"bearer": []}]
        op["x-kiln-scope"] = scope
        extra += [401, 403, 503]
    if rule.rule.startswith(("/v1/", "/predict")):
        extra.append(503)  # the store is read on every request
    for code in extra:
        responses.setdefault(code, GENERIC[code])
    if not any(200 <= int(code) < 300 for code in responses):
        responses[200] = "success"
    op["responses"] = {str(code): _response(int(code), text)
                       for code, text in sorted(responses.items(), key=lambda kv: int(kv[0]))}
    for code, links in facts.get("links", {}).items():
        op["responses"][str(code)]["links"] = {
            name: {"operationId": op_ids[(endpoint, _method_of(app, endpoint))], "parameters": parameters}
            for name, (endpoint, parameters) in links.items() if _method_of(app, endpoint)}
    if scope is None:
        op["security"] = []  # public: no token needed
    return op


def _method_of(app, endpoint: str) -> str | None:
    for rule in app.url_map.iter_rules(endpoint):
        methods = sorted((rule.methods or set()) - HIDDEN_METHODS)
        return methods[0] if methods else None
    return None


def _documented_rules(app):
    return [r for r in sorted(app.url_map.iter_rules(), key=lambda r: r.rule)
            if r.endpoint != "static" and not r.endpoint.endswith(".static")]


def build_spec(app) -> dict:
    """The OpenAPI 3.1 document for every route registered on ``app`` (static files aside)."""
    rules = _documented_rules(app)
    op_ids = {}
    for rule in rules:
        methods = sorted((rule.methods or set()) - HIDDEN_METHODS)
        for method in methods:
            op_ids[(rule.endpoint, method)] = rule.endpoint if len(methods) == 1 else f"{rule.endpoint}.{method.lower()}"
    paths: dict = {}
    for rule in rules:
        item = paths.setdefault(openapi_path(rule.rule), {})
        for method in sorted((rule.methods or set()) - HIDDEN_METHODS):
            item[method.lower()] = _operation(app, rule, method, op_ids)
    settings = app_settings(app)
    security = [{"bearer": []}] if settings.auth_enabled else []
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": "1",
                 "description": "Train and serve PyTorch image classifiers. Errors are "
                                '{"error": {"code", "message", "details"}}. Authenticated operations need '
                                "`Authorization: Bearer <token>` with the scope named in x-kiln-scope "
                                "(admin implies all, submit implies read)."},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": security,
        "paths": paths,
        "components": {"schemas": {**schemas.components(), **response_components()},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a Kiln token: kiln_<id>_<secret>"}}},
    }


# Keys whose value maps names to schemas (or to objects holding them), never a schema itself.
NAME_MAPS = {"properties", "patternProperties", "$defs", "schemas", "paths", "responses", "content", "headers",
             "links", "securitySchemes", "components"}


def as_openapi_30(node):
    """The 3.1 document rewritten for readers of OpenAPI 3.0 (Swagger UI 4): ``const`` as a one-value
    enum, ``type: null`` as ``nullable``, numeric exclusive bounds as 3.0's booleans, no if/then/else."""
    if isinstance(node, list):
        return [as_openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: {n: as_openapi_30(v2) for n, v2 in v.items()} if k in NAME_MAPS and isinstance(v, dict)
            else as_openapi_30(v) for k, v in node.items()}
    if str(node.get("openapi", "")).startswith("3.1"):
        node["openapi"] = "3.0.3"
        node.pop("jsonSchemaDialect", None)
    for key in ("if", "then", "else"):
        node.pop(key, None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("type"), list):
        kinds = [t for t in node["type"] if t != "null"]
        node["type"], node["nullable"] = (kinds[0] if kinds else "string"), "null" in node["type"]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[plain], node[bound] = value, True
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and {"type": "null"} in branches:
            rest = [b for b in branches if b != {"type": "null"}]
            del node[key]
            node.update({**rest[0], "nullable": True} if len(rest) == 1 else {key: rest, "nullable": True})
    return node


@bp.get("/openapi.json")
@schemas.doc(responses={200: ("this document", {"type": "object"})})
def spec():
    """The OpenAPI 3.1 description of this API."""
    return jsonify(build_spec(current_app))


@bp.get("/docs/openapi-3.0.json")
@schemas.doc(responses={200: ("the same document in OpenAPI 3.0 form (for Swagger UI 4)", {"type": "object"})})
def spec_30():
    """This API's description for OpenAPI 3.0 readers (what /docs renders)."""
    return jsonify(as_openapi_30(build_spec(current_app)))


@bp.get("/docs")
@schemas.doc(responses={200: ("Swagger UI", {"type": "string"}, "text/html")})
def docs():
    """Swagger UI over this API, served from the swagger-ui-bundle wheel; Authorize takes a token."""
    return render_template("docs.html", spec_url=url_for("openapi.spec_30"),
                           ui=lambda name: url_for("openapi.static", filename=name))
