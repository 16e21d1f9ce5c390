"""Config errors: one FieldError per bad field, named in dotted form (``training.lr``).

``field_errors`` turns Pydantic's validation errors into those, with messages that say what
the field accepts and never echo more than a short excerpt of what was sent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, get_args

MAX_ERRORS = 100  # a body with thousands of unknown keys gets this many details, then a count

_UNKNOWN_KEY = {"unexpected_keyword_argument", "extra_forbidden", "invalid_key"}
_BOUNDS = {
    "greater_than": ("gt", "must be > {}, got {}"), "greater_than_equal": ("ge", "must be >= {}, got {}"),
    "less_than": ("lt", "must be < {}, got {}"), "less_than_equal": ("le", "must be <= {}, got {}"),
}
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "none_required": "null",
    "dataclass_type": "a mapping", "dataclass_exact_type": "a mapping", "dict_type": "a mapping",
    "model_type": "a mapping",
    "list_type": "a list",
}


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def to_dict(self) -> dict:
        return {"field": self.field, "message": self.message}


class ConfigError(ValueError):
    """A config failed validation; ``errors`` holds one FieldError per bad field."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("invalid config: " + "; ".join(f"{e.field}: {e.message}" for e in self.errors))


def short(value: Any) -> str:
    """A bounded, safe description of a submitted value (huge ints and deep lists are never printed)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        if abs(value) < 10**18:
            return repr(value)
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, str):
        return repr(_printable(value if len(value) <= 60 else value[:57] + "..."))
    return type(value).__name__


def _printable(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON, not in UTF-8) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _key(item: Any) -> str:
    text = _printable(item) if isinstance(item, str) else short(item)
    return text if len(text) <= 80 else text[:77] + "..."


def _fields(cls: Any) -> dict[str, Any]:
    branches = [a for a in get_args(cls) if a is not type(None)]
    if len(branches) == 1 and dataclasses.is_dataclass(branches[0]):  # an optional section (training.profile)
        cls = branches[0]
    return {f.name: f.type for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def _locate(cls: type, loc: tuple, kind: str) -> tuple[str, Any]:
    """(dotted field name, the dataclass that owns it) for an error's location.

    A location goes on past a field when the field is a union (the branch's tag follows):
    the walk stops at the first element that is not a field of the current dataclass.
    """
    parts: list[str] = []
    owner, current = cls, cls
    for item in loc:
        fields = _fields(current)
        if isinstance(item, str) and item in fields:
            parts.append(item)
            owner, current = current, fields[item]
            continue
        if kind in _UNKNOWN_KEY and current is not None and fields:
            parts.append(_key(item))
            owner = current
        break
    return ".".join(parts) or "config", owner


def _message(errors: list[dict], owner: Any) -> str:
    """One message for every error Pydantic reported on one field (one per union branch)."""
    kinds = [e["type"] for e in errors]
    value = errors[0].get("input")
    if set(kinds) & _UNKNOWN_KEY:
        prefix = "unknown key" if "invalid_key" not in kinds else "keys must be strings"
        return f"{prefix}; allowed: {', '.join(_fields(owner))}"
    if "missing" in kinds:
        return "is required"
    for e in errors:  # a branch that took the type but refused the value says the most
        if e["type"] in _BOUNDS:
            key, text = _BOUNDS[e["type"]]
            return text.format(e["ctx"][key], short(e["input"]))
        if e["type"] == "finite_number":
            return f"must be a finite number, got {short(e['input'])}"
        if e["type"] == "string_too_long":
            return f"is longer than {e['ctx']['max_length']} characters"
        if e["type"] == "string_too_short":
            return "must not be empty"
        if e["type"] == "value_error":
            return str(e["ctx"]["error"])
        if e["type"] == "string_unicode":
            return "must be valid Unicode text"
    pattern = next((e["ctx"]["pattern"] for e in errors if e["type"] == "string_pattern_mismatch"), None)
    literal = next((e["ctx"]["expected"] for e in errors if e["type"] == "literal_error"), None)
    choice = set(kinds) <= {"literal_error", "string_pattern_mismatch"} and isinstance(value, str)
    if choice and literal and pattern:  # a built-in name or an id
        return (f"unknown value {short(value)}; expected {literal.replace(' or ', ', ')} "
                f"or an uploaded dataset id (32 hex digits)")
    if choice and literal:
        return f"unknown value {short(value)}; expected one of {literal}"
    if choice:
        return f"{short(value)} does not match the expected format {pattern}"
    if "float_type" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return f"must be a finite number within the field's range, got {short(value)}"
    expected = []
    for e in errors:
        if e["type"] == "literal_error":
            phrase = e["ctx"]["expected"]
        elif e["type"] == "string_pattern_mismatch":
            phrase = f"a string matching {e['ctx']['pattern']}"
        else:
            phrase = _EXPECTED.get(e["type"], e["msg"])
        if phrase not in expected:
            expected.append(phrase)
    return f"must be {' or '.join(expected)}, got {short(value)}"


def field_errors(exc: Any, cls: type) -> list[FieldError]:
    """A Pydantic ValidationError on ``cls`` -> one FieldError per field, in the order reported."""
    grouped: dict[str, tuple[Any, list[dict]]] = {}
    for err in exc.errors(include_url=False):
        name, owner = _locate(cls, tuple(err["loc"]), err["type"])
        grouped.setdefault(name, (owner, []))[1].append(err)
    out = [FieldError(name, _message(errs, owner)) for name, (owner, errs) in grouped.items()]
    if len(out) > MAX_ERRORS:
        out = out[:MAX_ERRORS] + [FieldError("config", f"and {len(out) - MAX_ERRORS} more errors")]
    return out
