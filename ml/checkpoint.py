"""One checkpoint schema: a plain dict saved atomically, loadable with weights_only=True.

``save_checkpoint`` writes ``<name>.pt`` with ``ml.files.atomic_write`` (a crash never leaves
a half-written checkpoint) and a small JSON sidecar ``<name>.json`` so a run can be inspected
without torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ml.files import atomic_write

FORMAT = "kiln.checkpoint/1"
KILN_VERSION = "0.1.0"
# Keys copied into the JSON sidecar (everything except tensors/state dicts).
_SIDECAR_KEYS = ("format", "epoch", "step", "batch_in_epoch", "classes", "normalization", "image_size",
                 "in_channels", "metrics", "best", "world_size", "versions", "config")


def versions() -> dict:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "kiln": KILN_VERSION}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind torch.compile / DataParallel / DDP wrappers (what we save)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` and its JSON sidecar."""
    path = Path(path)
    state = {"format": FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))
    sidecar = {k: state[k] for k in _SIDECAR_KEYS if k in state}
    sidecar["size"] = path.stat().st_size
    text = json.dumps(sidecar, indent=1, default=str).encode()
    atomic_write(path.with_suffix(".json"), text)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a Kiln checkpoint with ``torch.load(weights_only=True)`` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated / foreign pickles surface as many exception types
        raise ValueError(f"{path} is not a readable checkpoint ({exc}); was it written by Kiln?") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a Kiln checkpoint (no 'model' state)")
    return state
