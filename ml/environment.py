"""What a run needs recorded to be reproduced: the software and hardware it ran on, the dataset's
content hash, and ``manifest.json`` (resolved config, seed, dataset hash, environment).

The Kiln version is ``KILN_VERSION`` when a deploy sets it, else the git commit of this checkout
(``git rev-parse HEAD``, bounded by a timeout), else "unknown".
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import torch

from configs.schema import TrainConfig, to_dict
from ml.files import atomic_write

FORMAT = "kiln.manifest/1"
ROOT = Path(__file__).resolve().parents[1]
_CONTENT_HASH_MAX_BYTES = 4 << 30  # image folders above this are hashed by listing (path, size), not content


@functools.cache
def kiln_version() -> str:
    """KILN_VERSION, else ``git rev-parse HEAD`` of the checkout this module runs from, else "unknown"."""
    if os.environ.get("KILN_VERSION"):
        return os.environ["KILN_VERSION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def environment(device: torch.device, world_size: int = 1) -> dict:
    """Versions of Kiln, python, torch, torchvision, CUDA/cuDNN, and the device, world size and threads."""
    import numpy
    import torchvision

    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None
    return {"kiln": kiln_version(), "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": numpy.__version__, "cuda": cuda,
            "cudnn": cudnn, "device": str(device), "device_name": name, "world_size": int(world_size),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "executable": sys.executable}


# ------------------------------------------------------------------ dataset hash
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def dataset_hash(cfg: TrainConfig, data, root: str | None) -> dict:
    """sha256 of what the run trains and validates on, and how it was taken.

    ``tensors``: the pre-tensorised, normalised train and val tensors and labels (digits, fake and
    other in-memory sets: covers the split, subset, image size and normalisation); ``files``: every
    image file under ``root`` (uploaded sets, image folders), its relative path and content;
    ``listing``: relative paths and sizes only, for folders over 4 GiB (reading them all at each
    start would cost more than the run's first epoch).
    """
    from ml.data import TensorImages

    h = hashlib.sha256()
    if isinstance(data.train, TensorImages) and isinstance(data.val, TensorImages):
        for part in (data.train, data.val):
            h.update(str(tuple(part.x.shape)).encode())
            h.update(_tensor_bytes(part.x))
            h.update(_tensor_bytes(part.y))
        return {"sha256": h.hexdigest(), "method": "tensors", "train": len(data.train), "val": len(data.val)}
    if root is None:
        raise ValueError("dataset_hash: an on-disk dataset needs its root folder")
    from ml import folders

    listing = folders.list_images(root)
    sizes = [f.stat().st_size for f in listing.files]
    method = "files" if sum(sizes) <= _CONTENT_HASH_MAX_BYTES else "listing"
    for i, (path, size) in enumerate(zip(listing.files, sizes)):
        h.update(f"{listing.relative(i)}\0{size}\0".encode())
        if method == "files":
            h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(json.dumps({"split": [data.train_indices.tolist(), data.val_indices.tolist()]}).encode())
    return {"sha256": h.hexdigest(), "method": method, "files": len(sizes), "bytes": sum(sizes),
            "train": len(data.train), "val": len(data.val)}


# ------------------------------------------------------------------ manifest
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(out: Path, cfg: TrainConfig, data, device: torch.device, world_size: int,
                   dataset_roots: Mapping[str, str] | None, resumed: Mapping | None = None) -> dict:
    """Write ``out/manifest.json``; a resumed run (``resumed``: epoch, step) keeps the first attempt's
    record and appends its own environment and dataset hash under ``resumes``."""
    root = cfg.data.root if cfg.data.dataset == "imagefolder" else (dataset_roots or {}).get(cfg.data.dataset)
    dataset = {"name": cfg.data.dataset, "classes": list(data.classes), **dataset_hash(cfg, data, root)}
    env = environment(device, world_size)
    path = out / "manifest.json"
    previous = None
    if resumed is not None and path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
    if previous is not None:
        manifest = previous
        manifest.setdefault("resumes", []).append(
            {"at": _now(), "epoch": int(resumed["epoch"]), "step": int(resumed["step"]),
             "dataset_sha256": dataset["sha256"], "environment": env})
    else:
        manifest = {"format": FORMAT, "created_at": _now(), "seed": cfg.training.seed,
                    "deterministic": cfg.training.deterministic, "dataset": dataset, "environment": env,
                    "config": to_dict(cfg), "resumes": []}
    atomic_write(path, (json.dumps(manifest, indent=1, default=str) + "\n").encode("utf-8"), mode=0o644)
    return manifest
