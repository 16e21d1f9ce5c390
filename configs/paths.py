"""Local paths in a job config (``data.root``, ``model.weights``) and the data roots an operator allows.

A path is accepted only when it is absolute and its real path (symlinks followed) lies under one
of the roots; the web tier checks at submit and the worker again before it opens anything.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from configs.errors import ConfigError, FieldError


def split_roots(raw: str) -> tuple[str, ...]:
    """``KILN_DATA_ROOTS`` (os.pathsep-separated) -> the real paths of its non-empty entries."""
    return tuple(os.path.realpath(part) for part in raw.split(os.pathsep) if part.strip())


def config_paths(kind: str, config: Mapping) -> list[tuple[str, str]]:
    """(dotted field, path) for each local path a config (as plain data) names."""
    found = []
    data = config.get("data") if isinstance(config, Mapping) else None
    if isinstance(data, Mapping) and isinstance(data.get("root"), str):
        found.append(("data.root", data["root"]))
    model = config.get("model") if isinstance(config, Mapping) else None
    if kind == "train" and isinstance(model, Mapping) and isinstance(model.get("weights"), str):
        found.append(("model.weights", model["weights"]))
    return found


def resolve_under(path: str, roots: Iterable[str]) -> str | None:
    """The real path of ``path`` if it is absolute and lies under one of ``roots`` (real paths), else None."""
    if not os.path.isabs(path):
        return None
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):  # NUL bytes, over-long names
        return None
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    return None


def check_paths(kind: str, config: Mapping, roots: tuple[str, ...]) -> dict[str, str]:
    """{field: real path} for the config's local paths; ConfigError naming each one outside ``roots``.

    Messages name the field and the path that was sent, never the roots or anything on disk.
    """
    resolved, errors = {}, []
    for field, path in config_paths(kind, config):
        real = resolve_under(path, roots)
        if real is not None:
            resolved[field] = real
        elif not os.path.isabs(path):
            errors.append(FieldError(field, "must be an absolute path under a data root this service allows"))
        elif not roots:
            errors.append(FieldError(field, "local paths are not allowed here (no data roots are configured); "
                                            "upload the images with POST /v1/datasets"))
        else:
            errors.append(FieldError(field, "is not under a data root this service allows (KILN_DATA_ROOTS)"))
    if errors:
        raise ConfigError(errors)
    return resolved


def with_paths(config: dict, resolved: Mapping[str, str]) -> dict:
    """A copy of ``config`` whose fields in ``resolved`` ({"data.root": path}) hold those paths."""
    out = dict(config)
    for field, path in resolved.items():
        section, key = field.split(".")
        out[section] = {**out[section], key: path}
    return out
