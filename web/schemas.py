"""Request schemas: small JSON Schema documents that both validate requests and feed /openapi.json.

``validate`` checks a body against one of them and ``parse_query`` does the same for
query strings (with string -> int/bool coercion). A job's ``config`` is checked by
``configs.parse_config`` and published with ``configs.json_schema``: both read the
same dataclass metadata, so the spec and the validator cannot drift apart.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from configs import PredictConfig, TrainConfig, json_schema, parse_config
from configs.names import JOB_KINDS, JOB_STATES, MODEL_REF_RE, NAME_RE
from worker.errors import BadRequest, InvalidInput

JOB_SUBMISSION = {
    "type": "object", "additionalProperties": False, "required": ["config"],
    "properties": {
        "kind": {"type": "string", "enum": list(JOB_KINDS), "default": "train",
                 "description": "train or predict"},
        "config": {"type": "object", "description": "a TrainConfig (kind train) or PredictConfig (kind predict)"},
    },
}
JOB_QUERY = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": list(JOB_STATES), "description": "only jobs in this state"},
        "kind": {"type": "string", "enum": list(JOB_KINDS), "description": "only jobs of this kind"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50, "description": "page size"},
        "offset": {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0,
                   "description": "jobs to skip (newest first)"},
    },
}
LOG_QUERY = {
    "type": "object",
    "properties": {
        "offset": {"type": "integer", "minimum": 0, "maximum": 2**53, "default": 0,
                   "description": "byte offset to read from"},
        "follow": {"type": "boolean", "default": False, "description": "stream until the job ends"},
    },
}
PREDICT_QUERY = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "pattern": MODEL_REF_RE, "description": "name, name:version or name@alias"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5,
                  "description": "probabilities per input (at most the model's classes)"},
    },
}
DATASET_UPLOAD = {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "zip in ImageFolder layout <class>/<image>"},
        "name": {"type": "string", "pattern": NAME_RE, "description": "display name (default: file name)"},
    },
}
DATASET_NAME = DATASET_UPLOAD["properties"]["name"]
MODEL_REGISTRATION = {
    "type": "object", "additionalProperties": False, "required": ["name", "job_id"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_RE, "description": "model name"},
        "job_id": {"type": "string", "description": "a succeeded train job"},
        "checkpoint": {"type": "string", "enum": ["best", "last"], "default": "best"},
    },
}
ALIAS = {
    "type": "object", "additionalProperties": False, "required": ["version"],
    "properties": {"version": {"type": "integer", "minimum": 1, "description": "version the alias points to"}},
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def _check(schema: dict, value: Any, path: str, errors: list[dict]) -> Any:
    """Validate one value; append {"field", "message"} per problem; return it with defaults."""
    kind = schema.get("type")
    if kind:
        ok = isinstance(value, _TYPES[kind]) and not (isinstance(value, bool) and kind in ("integer", "number"))
        if not ok:
            errors.append({"field": path, "message": f"must be of type {kind}, got {type(value).__name__}"})
            return value
    if "enum" in schema and (isinstance(value, (dict, list)) or value not in schema["enum"]):
        errors.append({"field": path, "message": f"must be one of {', '.join(map(str, schema['enum']))}, "
                                                 f"got {_short(value)}"})
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append({"field": path, "message": f"{_short(value)} does not match {schema['pattern']}"})
        if len(value) > schema.get("maxLength", 4096):
            errors.append({"field": path, "message": "is too long"})
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append({"field": path, "message": f"must be >= {schema['minimum']}, got {value}"})
        if "maximum" in schema and value > schema["maximum"]:
            errors.append({"field": path, "message": f"must be <= {schema['maximum']}, got {value}"})
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        out = {}
        for key, sub in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in props:
                out[key] = _check(props[key], sub, where, errors)
            elif schema.get("additionalProperties", True) is False:
                errors.append({"field": where, "message": f"unknown key; allowed: {', '.join(props)}"})
        for key in schema.get("required", ()):
            if key not in value:
                errors.append({"field": f"{path}.{key}" if path else key, "message": "is required"})
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
        return out
    return value


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def validate(schema: dict, data: Any, what: str = "request body") -> dict:
    """``data`` checked against ``schema`` (defaults filled in); 422 with one detail per bad field."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(data).__name__}",
                           [{"field": "body", "message": "must be an object"}])
    errors: list[dict] = []
    out = _check(schema, data, "", errors)
    if errors:
        raise InvalidInput(f"invalid {what}: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                           errors)
    return out


def parse_query(schema: dict, args, *, max_limit: int | None = None) -> dict:
    """Query-string values coerced to the schema's types and checked; 400 with one detail per bad one."""
    props = dict(schema["properties"])
    if max_limit is not None and "limit" in props:
        props["limit"] = {**props["limit"], "maximum": max_limit}
    data, errors = {}, []
    for key, sub in props.items():
        if key not in args:
            continue
        raw = args.get(key, "")
        if sub.get("type") == "integer":
            if not re.fullmatch(r"[+-]?[0-9]{1,18}", raw.strip()):
                errors.append({"field": key, "message": f"must be an integer, got {raw!r}"})
                continue
            data[key] = int(raw)
        elif sub.get("type") == "boolean":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", ""):
                errors.append({"field": key, "message": f"must be true or false, got {raw!r}"})
                continue
            data[key] = raw.lower() in ("1", "true", "yes")
        else:
            data[key] = raw
    out = _check({**schema, "properties": props}, data, "", errors)
    if errors:
        raise BadRequest("invalid query parameters: " + "; ".join(
            f"{e['field']}: {e['message']}" for e in errors), errors, code="bad_query")
    return out


def validate_job(data: Any) -> tuple[str, dict]:
    """A job submission -> (kind, config mapping); ConfigError (422) names each bad config field."""
    body = validate(JOB_SUBMISSION, data, "job submission")
    parse_config(body["config"], body["kind"])  # raises ConfigError with every bad field at once
    return body["kind"], body["config"]


def components() -> dict:
    """Named schemas for the OpenAPI document."""
    return {
        "TrainConfig": json_schema(TrainConfig),
        "PredictConfig": json_schema(PredictConfig),
        "JobSubmission": {**JOB_SUBMISSION, "properties": {
            **JOB_SUBMISSION["properties"],
            "config": {"oneOf": [{"$ref": "#/components/schemas/TrainConfig"},
                                 {"$ref": "#/components/schemas/PredictConfig"}],
                       "description": JOB_SUBMISSION["properties"]["config"]["description"]}}},
        "DatasetUpload": DATASET_UPLOAD,
        "ModelRegistration": MODEL_REGISTRATION,
        "Alias": ALIAS,
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message", "details"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}}},
    }


def doc(*, body: str | None = None, body_types: tuple[str, ...] = ("application/json",),
        query: dict | None = None, responses: dict[int, str] | None = None) -> Callable:
    """Attach OpenAPI facts to a view: body schema name (in components), query schema, responses."""
    def wrap(view: Callable) -> Callable:
        view.openapi = {"body": body, "body_types": body_types, "query": query, "responses": responses or {}}
        return view
    return wrap
