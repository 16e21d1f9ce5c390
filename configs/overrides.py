"""Reading a config mapping from YAML and applying dotted ``section.key=value`` overrides.

Neither step recurses into what it was given, so deeply nested input cannot exhaust the stack;
whatever PyYAML raises on odd input becomes a ConfigError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from configs.errors import ConfigError, FieldError

# What PyYAML raises besides YAMLError on odd scalars: 2001-02-30 (ValueError), !!bool maybe (KeyError),
# !!float abc, 5000-digit ints (ValueError), deep nesting (RecursionError).
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, LookupError, ArithmeticError, RecursionError)


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """``data`` with dotted ``key.sub=value`` overrides applied (values parsed as YAML); ``data`` is not changed.

    Only the mappings along an override's path are copied.
    """
    if not overrides:
        return data
    if not isinstance(data, dict):
        raise ConfigError([FieldError("config", f"must be a mapping, got {type(data).__name__}")])
    out = dict(data)
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(FieldError(item[:80], "override must look like section.key=value"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except YAML_ERRORS:
            errors.append(FieldError(key, f"{raw.strip()[:60]!r} is not a valid YAML value"))
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                errors.append(FieldError(key, "cannot override inside a non-mapping value"))
                break
            child = node[part] = dict(child)  # a copy: the caller's mapping stays as it was
            node = child
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return out


def read_mapping(source: str | Path | dict) -> Any:
    """A mapping as given, or the YAML document at a path (empty -> {}); ConfigError if it does not parse."""
    if isinstance(source, dict):
        return source
    text = Path(source).read_text()
    try:
        data = yaml.safe_load(text)
    except YAML_ERRORS as exc:
        reason = str(exc) if isinstance(exc, yaml.YAMLError) else type(exc).__name__
        raise ConfigError([FieldError("config", f"is not valid YAML: {reason[:500]}")]) from None
    return data if data is not None else {}
