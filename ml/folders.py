"""Image folders: the one list of image extensions and the one listing of a folder's images.

Training, ``ml.evaluate`` and batch prediction list files here, so all three see the same
images in the same order (hidden files skipped); dataset uploads accept the same extensions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def is_image(name: str) -> bool:
    """Whether a file name has one of IMAGE_EXTENSIONS (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Listing:
    """The images under ``root``, sorted by path components (class folder, then file name)."""
    root: Path
    files: list[Path]
    labels: list[str] | None  # each file's class folder when every image sits under one, else None

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels or ()))

    def relative(self, i: int) -> str:
        """The i-th file relative to the root, '/'-separated (what predictions.jsonl records)."""
        return self.files[i].relative_to(self.root).as_posix()


def list_images(root: str | Path) -> Listing:
    """Every image file under ``root`` (recursively); ValueError when the folder is missing or has none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".") and is_image(n)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    files = sorted(found, key=lambda p: p.relative_to(root).parts)
    parts = [p.relative_to(root).parts for p in files]
    labels = [p[0] for p in parts] if all(len(p) >= 2 for p in parts) else None
    return Listing(root, files, labels)


def labelled(root: str | Path) -> Listing:
    """``list_images`` for ImageFolder layout (<root>/<class>/<image>); ValueError says what is missing."""
    listing = list_images(root)
    if listing.labels is None:
        raise ValueError(f"{root} has images outside class folders; expected <root>/<class>/<image>")
    return listing


def open_rgb(path: str | Path) -> Image.Image:
    """A file decoded to RGB, as torchvision's ImageFolder loader does (so accuracies compare)."""
    from ml import images

    with open(path, "rb") as f:
        return images.load_image(images.open_image(f, where=str(path)), where=str(path)).convert("RGB")
