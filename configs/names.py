"""The names every layer shares: id and name patterns, job kinds and job states.

Patterns are plain strings in the dialect JSON Schema and Python's ``re`` both accept
(no named groups), so the same text validates requests and appears in /openapi.json. In
Python, match them with ``re.fullmatch``: ``re.search``'s ``$`` also matches before a
trailing newline, so a name with a newline at its end would pass.
"""
from __future__ import annotations

import re

HEX_ID = r"[0-9a-f]{32}"                     # jobs, datasets and tokens: uuid4().hex
NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"    # models, aliases, dataset display names
TOKEN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"  # a token's label may be an e-mail address
VERSION = r"[0-9]{1,9}"
MAX_VERSION = 999_999_999  # a model version has at most nine digits

ID_RE = rf"^{HEX_ID}$"
NAME_RE = rf"^{NAME}$"
TOKEN_NAME_RE = rf"^{TOKEN_NAME}$"
# A model reference for predict jobs and /predict: name, name:version or name@alias.
MODEL_REF_RE = rf"^{NAME}((:{VERSION})|(@{NAME}))?$"
# A torch device a job may ask for: cuda's index is bounded (a host has at most 64 GPUs here).
DEVICE_RE = r"^(auto|cpu|mps|cuda(:([0-9]|[1-5][0-9]|6[0-3]))?)$"

JOB_KINDS = ("train", "predict", "sweep")
JOB_STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
ACTIVE_STATES = ("running", "cancelling")
# what ml.runtimes can measure against eager when a model version is registered (KILN_SERVING_RUNTIMES)
SERVING_RUNTIMES = ("onnxruntime", "compile", "bf16")


def is_id(value) -> bool:
    """Whether ``value`` is a job, dataset or token id (32 lowercase hex digits)."""
    return isinstance(value, str) and re.fullmatch(HEX_ID, value) is not None


def parse_model_ref(ref: str) -> tuple[str, int | None, str | None] | None:
    """'name' | 'name:3' | 'name@production' -> (name, version or None, alias or None); None if malformed."""
    if not isinstance(ref, str) or re.fullmatch(MODEL_REF_RE, ref) is None:
        return None
    name, sep, rest = ref.partition(":")
    if sep:
        return name, int(rest), None
    name, sep, alias = ref.partition("@")
    return name, None, alias if sep else None
