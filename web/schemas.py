"""Request schemas: small JSON Schema documents that both validate requests and feed /openapi.json.

``validate`` checks a body against one of them and ``parse_query`` does the same for
query strings (with string -> int/bool coercion); ``check`` covers the keywords these
schemas use, with JSON Schema's meaning (a pattern's ``$`` is the end of the text, not
a trailing newline). A job's ``config`` is checked by ``configs.parse_config`` and
published with ``configs.json_schema``: both come from the same Pydantic classes, so
the spec and the validator cannot drift apart. Path parameters are published with the
patterns the views enforce (PATH_PARAMS).
"""
from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

from configs import PredictConfig, TrainConfig, json_schema, parse_config
from configs.names import ID_RE, JOB_KINDS, JOB_STATES, MAX_VERSION, MODEL_REF_RE, NAME_RE, TOKEN_NAME_RE
from worker.errors import BadRequest, InvalidInput
from worker.protocol import PRIORITY_MAX, PRIORITY_MIN

PRIORITY = {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX, "default": PRIORITY_MIN,
            "description": f"{PRIORITY_MIN} (default) to {PRIORITY_MAX}: higher runs first, then first-come"}
SUBMIT_QUERY = {"type": "object", "properties": {"priority": {
    **PRIORITY, "description": "the job's priority (higher first) unless the body gives one "
                              "(which wins; a bare YAML config cannot)"}}}
JOB_SUBMISSION = {
    "type": "object", "additionalProperties": False, "required": ["config"],
    "properties": {
        "kind": {"type": "string", "enum": list(JOB_KINDS), "default": "train",
                 "description": "train, predict or sweep"},
        "config": {"type": "object", "description": "a TrainConfig (kind train), PredictConfig (kind predict) "
                                                    "or SweepConfig (kind sweep)"},
        "priority": PRIORITY,
    },
}
JOB_QUERY = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": list(JOB_STATES), "description": "only jobs in this state"},
        "kind": {"type": "string", "enum": list(JOB_KINDS), "description": "only jobs of this kind"},
        "parent": {"type": "string", "pattern": ID_RE, "description": "only the trials of this sweep"},
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
DATASET_NAME = {"type": "string", "pattern": NAME_RE, "description": "display name (default: the file name)"}
DATASET_UPLOAD = {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "zip in ImageFolder layout <class>/<image>"},
        "name": DATASET_NAME,
    },
}
DATASET_QUERY = {"type": "object", "properties": {"name": {
    **DATASET_NAME, "description": "display name (a multipart `name` field takes precedence)"}}}
MODEL_REGISTRATION = {
    "type": "object", "additionalProperties": False, "required": ["name", "job_id"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_RE, "description": "model name"},
        "job_id": {"type": "string", "pattern": ID_RE, "description": "a succeeded train job"},
        "checkpoint": {"type": "string", "enum": ["best", "last"], "default": "best"},
    },
}
ALIAS = {
    "type": "object", "additionalProperties": False, "required": ["version"],
    "properties": {"version": {"type": "integer", "minimum": 1, "maximum": MAX_VERSION,
                               "description": "version the alias points to"}},
}
SCOPE = {"type": "string", "enum": ["read", "submit", "predict", "admin"]}
TOKEN_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["name", "scopes"],
    "not": {"required": ["expires_in_s", "expires_at"]},
    "description": "a new token; expires_in_s or expires_at (not both) bound its life, else it never expires",
    "properties": {
        "name": {"type": "string", "pattern": TOKEN_NAME_RE,
                 "description": "a label, unique among active tokens (who or what uses it)"},
        "scopes": {"type": "array", "items": SCOPE, "minItems": 1, "maxItems": 4, "uniqueItems": True,
                   "description": "read, submit (implies read), predict, admin (implies all)"},
        "expires_in_s": {"type": "integer", "minimum": 1, "maximum": 10 * 365 * 24 * 3600,
                         "description": "seconds until it expires (at most ten years)"},
        "expires_at": {"type": "string", "format": "date-time",
                       "description": "when it expires (RFC 3339, in the future)"},
    },
}
# Path parameters by name, as the views check them (a value outside the pattern is a 404).
HEX = {"type": "string", "pattern": ID_RE}
PATH_PARAMS = {
    "job_id": {**HEX, "description": "a job id (32 hex digits)"},
    "dataset_id": {**HEX, "description": "an uploaded dataset id (32 hex digits)"},
    "token_id": {**HEX, "description": "a token id (32 hex digits)"},
    "name": {"type": "string", "pattern": NAME_RE, "description": "a model name"},
    "alias": {"type": "string", "pattern": NAME_RE, "description": "an alias name (production, staging, ...)"},
}
_SEG = r"[^\x00-\x1f/\\]"
_FIRST = rf"(?:[^\x00-\x1f./\\]|[^\x00-\x1f./\\][^\x00-\x1f:/\\]{_SEG}*|\.[^\x00-\x1f.:/\\]{_SEG}*|\.\.{_SEG}+)"
_NEXT = rf"(?:[^\x00-\x1f./\\]{_SEG}*|\.[^\x00-\x1f./\\]{_SEG}*|\.\.{_SEG}+)"
# web.jobs.safe_artifact_name: relative, '/'-separated, no '.', '..' or empty segment, no NUL or
# backslash, no drive letter ('c:'); control characters never name an artifact Kiln writes.
ARTIFACT_PATH = {"type": "string", "pattern": rf"^{_FIRST}(?:/{_NEXT})*$",
                 "description": "an artifact's path inside the job folder, e.g. checkpoints/best.pt"}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z")


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern:
    # JSON Schema's '$' ends the text; Python's also matches before a final newline ('abc\n').
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern)


def parse_datetime(text: str) -> datetime | None:
    """An RFC 3339 date-time (JSON Schema's format) as an aware datetime; None if it is not one."""
    if not isinstance(text, str) or not RFC3339.match(text):
        return None
    value = text.upper().replace(" ", "T").replace("Z", "+00:00")
    if ":60" in value[17:20]:  # a leap second: Python's datetime has none; the same instant, near enough
        value = value[:17] + "59" + value[19:]
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def check(schema: dict, value: Any, path: str, errors: list[dict]) -> Any:
    """Validate one value; append {"field", "message"} per problem; return it with defaults."""
    kind = schema.get("type")
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 3.0 is the integer 3 (JSON Schema agrees)
    if kind:
        ok = isinstance(value, _TYPES[kind]) and not (isinstance(value, bool) and kind in ("integer", "number"))
        if not ok:
            errors.append({"field": path or "body", "message": f"must be of type {kind}, got {type(value).__name__}"})
            return value
    if "enum" in schema and (isinstance(value, (dict, list)) or value not in schema["enum"]
                             or isinstance(value, bool) != any(isinstance(e, bool) for e in schema["enum"])):
        errors.append({"field": path, "message": f"must be one of {', '.join(map(str, schema['enum']))}, "
                                                 f"got {_short(value)}"})
    if isinstance(value, str):
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            errors.append({"field": path, "message": f"{_short(value)} does not match {schema['pattern']}"})
        if len(value) > schema.get("maxLength", 4096):
            errors.append({"field": path, "message": "is too long"})
        if schema.get("format") == "date-time" and parse_datetime(value) is None:
            errors.append({"field": path, "message": f"{_short(value)} is not an RFC 3339 date-time"})
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append({"field": path, "message": f"must be >= {schema['minimum']}, got {_short(value)}"})
        if "maximum" in schema and value > schema["maximum"]:
            errors.append({"field": path, "message": f"must be <= {schema['maximum']}, got {_short(value)}"})
    if isinstance(value, list):
        _check_array(schema, value, path, errors)
    if isinstance(value, dict):
        return _check_object(schema, value, path, errors)
    return value


def _check_array(schema: dict, value: list, path: str, errors: list[dict]) -> None:
    if len(value) < schema.get("minItems", 0):
        errors.append({"field": path, "message": f"needs at least {schema['minItems']} item(s)"})
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append({"field": path, "message": f"takes at most {schema['maxItems']} items"})
    if schema.get("uniqueItems") and len({repr(v) for v in value}) != len(value):
        errors.append({"field": path, "message": "has repeated items"})
    if "items" in schema:
        for i, item in enumerate(value[:1000]):
            check(schema["items"], item, f"{path}[{i}]", errors)


def _check_object(schema: dict, value: dict, path: str, errors: list[dict]) -> dict:
    props = schema.get("properties", {})
    out = {}
    for key, sub in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key in props:
            out[key] = check(props[key], sub, where, errors)
        elif schema.get("additionalProperties", True) is False:
            errors.append({"field": where, "message": f"unknown key; allowed: {', '.join(props)}"})
        else:
            out[key] = sub
    for key in schema.get("required", ()):
        if key not in value:
            errors.append({"field": f"{path}.{key}" if path else key, "message": "is required"})
    banned = schema.get("not", {}).get("required")
    if banned and all(key in value for key in banned):
        errors.append({"field": f"{path}.{banned[-1]}" if path else banned[-1],
                       "message": f"{' and '.join(banned)} cannot be given together"})
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = sub["default"]
    return out


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        text = f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def validate(schema: dict, data: Any, what: str = "request body") -> dict:
    """``data`` checked against ``schema`` (defaults filled in); 422 with one detail per bad field."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(data).__name__}",
                           [{"field": "body", "message": "must be an object"}])
    errors: list[dict] = []
    out = check(schema, data, "", errors)
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
    out = check({**schema, "properties": props}, data, "", errors)
    if errors:
        raise BadRequest("invalid query parameters: " + "; ".join(
            f"{e['field']}: {e['message']}" for e in errors), errors, code="bad_query")
    return out


def integral_numbers(value: Any) -> Any:
    """``value`` with every float that is a whole number (3.0) as an int: JSON has one number type,
    and JSON Schema's ``integer`` admits 3.0, so a config field typed integer must too."""
    root = [value]
    stack = [(root, 0)]  # (container, key): a loop, not recursion, whatever the depth
    while stack:
        container, key = stack.pop()
        item = container[key]
        if isinstance(item, float) and item.is_integer() and abs(item) < 2**63:
            container[key] = int(item)
        elif isinstance(item, dict):
            container[key] = copy = dict(item)
            stack.extend((copy, k) for k in copy)
        elif isinstance(item, list):
            container[key] = copy = list(item)
            stack.extend((copy, i) for i in range(len(copy)))
    return root[0]


def validate_job(data: Any) -> tuple[str, dict]:
    """A job submission -> (kind, config mapping); ConfigError (422) names each bad config field."""
    body = validate(JOB_SUBMISSION, data, "job submission")
    config = integral_numbers(body["config"])
    parse_config(config, body["kind"])  # raises ConfigError with every bad field at once
    return body["kind"], config


def config_classes() -> dict[str, type]:
    """kind -> its config class (configs.parse_config's own table when it has one)."""
    from configs import schema

    return dict(getattr(schema, "CLASSES", {"train": TrainConfig, "predict": PredictConfig}))


def components() -> dict:
    """Named request schemas for the OpenAPI document."""
    classes = config_classes()
    configs = {cls.__name__: json_schema(cls) for cls in classes.values()}
    branches = []
    for kind, cls in classes.items():
        branch = {"type": "object", "additionalProperties": False,
                  "required": ["config"] if kind == "train" else ["kind", "config"],
                  "properties": {"kind": {"type": "string", "const": kind},
                                 "config": {"$ref": f"#/components/schemas/{cls.__name__}"},
                                 "priority": PRIORITY}}
        branches.append(branch)
    return {
        **configs,
        "JobSubmission": {"oneOf": branches, "description": "kind (default train) and its config; "
                                                            "a YAML body may also be a bare TrainConfig"},
        "JobYaml": {"oneOf": [{"$ref": "#/components/schemas/JobSubmission"},
                              {"$ref": f"#/components/schemas/{classes['train'].__name__}"}]},
        "DatasetUpload": DATASET_UPLOAD,
        "ZipBody": {"type": "string", "format": "binary", "description": "a zip in ImageFolder layout"},
        "ModelRegistration": MODEL_REGISTRATION,
        "Alias": ALIAS,
        "TokenCreate": TOKEN_CREATE,
    }


def doc(*, body: str | None = None, body_types: tuple[str, ...] = ("application/json",),
        query: dict | None = None, responses: dict | None = None, path: dict | None = None,
        links: dict | None = None) -> Callable:
    """Attach OpenAPI facts to a view.

    ``body``: a component name (or {media type: component name}); ``query``: a query schema;
    ``responses``: {status: description | (description, component name or schema[, media type])};
    ``path``: schemas of path parameters beyond PATH_PARAMS; ``links``: {status: {link name:
    (endpoint, {parameter: runtime expression})}} from this answer to the reads it enables.
    """
    def wrap(view: Callable) -> Callable:
        view.openapi = {"body": body, "body_types": body_types, "query": query, "responses": responses or {},
                        "path": path or {}, "links": links or {}}
        return view
    return wrap
