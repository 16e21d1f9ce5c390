"""Uploaded datasets: check an ImageFolder zip entry by entry, then store it atomically.

Nothing is stored unless every check passes. Declared sizes are checked before a
byte is inflated (count, total size, per-entry compression ratio, unsafe names,
symlinks), then enforced again while extracting into a scratch folder (headers can
lie), then every image is decoded with PIL under a pixel limit. Only then is the
folder moved to datasets/<id>/<class>/<file> and the row inserted.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import struct
import tempfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image

from configs.names import is_id
from ml.folders import IMAGE_EXTENSIONS, is_image
from worker.clock import iso, utcnow
from worker.errors import InvalidInput, NotFound

RATIO_FLOOR = 1 << 20  # entries under 1 MiB inflated can't bomb anyone; a flat-colour BMP may compress 1000x
MAX_DETAILS = 50
CHUNK = 1 << 20
SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


class _Problems:
    """Collects {"entry", "message"} details; raises one InvalidInput naming every bad entry."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, entry: str, message: str) -> None:
        self.items.append({"entry": entry, "message": message})

    def raise_if_any(self, what: str = "dataset zip rejected") -> None:
        if not self.items:
            return
        shown = self.items[:MAX_DETAILS]
        if len(self.items) > MAX_DETAILS:
            shown.append({"entry": "*", "message": f"... and {len(self.items) - MAX_DETAILS} more problems"})
        first = "; ".join(f"{p['entry']}: {p['message']}" for p in self.items[:3])
        raise InvalidInput(f"{what}: {len(self.items)} problem(s): {first}", shown, code="invalid_dataset")


def _unsafe_name(info: zipfile.ZipInfo) -> str | None:
    """Why this entry must not be extracted, or None."""
    name = info.filename
    if "\x00" in name or "\\" in name:
        return "name contains a backslash or NUL; use '/' separators"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path; entries must be relative (<class>/<image>)"
    if ".." in PurePosixPath(name).parts:
        return "path escapes the dataset folder ('..')"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic links are not allowed"
    if info.flag_bits & 0x1:
        return "encrypted entries are not supported"
    if info.compress_type not in SUPPORTED_COMPRESSION:
        return f"unsupported compression method {info.compress_type}"
    return None


def _junk(parts: tuple[str, ...]) -> bool:
    # macOS Finder adds __MACOSX/ and .DS_Store; ml.folders skips hidden files too
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def plan_zip(zf: zipfile.ZipFile, settings) -> tuple[list[tuple[zipfile.ZipInfo, str, str]], set[str]]:
    """Check declared facts; return [(info, class, filename)] to extract and the set of class folders."""
    problems = _Problems()
    files, dirs, seen = [], [], set()
    for info in zf.infolist():
        why = _unsafe_name(info)
        if why:
            problems.add(info.filename, why)
            continue
        parts = tuple(p for p in PurePosixPath(info.filename).parts if p not in ("", "."))
        if not parts or _junk(parts):
            continue
        if info.is_dir():
            dirs.append(parts)
        elif parts in seen:
            problems.add(info.filename, "duplicate entry")
        else:
            seen.add(parts)
            files.append((info, parts))
    if len(files) > settings.max_dataset_files:
        problems.add("*", f"{len(files)} files; the limit is {settings.max_dataset_files}")
        problems.raise_if_any()
    total = sum(info.file_size for info, _ in files)
    if total > settings.max_dataset_unpacked_bytes:
        problems.add("*", f"unpacks to {total} bytes; the limit is {settings.max_dataset_unpacked_bytes}")
    for info, _ in files:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR and ratio > settings.max_compression_ratio:
            problems.add(info.filename, f"compression ratio {ratio:.0f} exceeds {settings.max_compression_ratio:g} "
                                        "(zip bomb?)")
    # One optional top-level folder (data.zip -> data/<class>/<image>) is stripped.
    tops = {p[0] for _, p in files} | {d[0] for d in dirs}
    strip = 1 if len(tops) == 1 and all(len(p) >= 3 for _, p in files) and files else 0
    plan, classes = [], {d[strip] for d in dirs if len(d) > strip}
    for info, parts in files:
        rel = parts[strip:]
        if len(rel) != 2:
            problems.add(info.filename, "expected <class>/<image> (optionally under one top-level folder)")
            continue
        if not is_image(rel[1]):
            problems.add(info.filename, f"not an image file; expected one of {', '.join(IMAGE_EXTENSIONS)}")
            continue
        classes.add(rel[0])
        plan.append((info, rel[0], rel[1]))
    problems.raise_if_any()
    return plan, classes


class _Abort(Exception):
    pass


def extract(zf: zipfile.ZipFile, plan, dest: Path, settings) -> int:
    """Inflate the planned entries into dest/<class>/<file>, enforcing sizes on actual bytes; total bytes."""
    problems, total = _Problems(), 0
    for info, cls, filename in plan:
        target, written = dest / cls / filename, 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while block := src.read(CHUNK):
                    written += len(block)
                    total += len(block)
                    if written > info.file_size:
                        raise _Abort("inflates to more than its header declares")
                    if total > settings.max_dataset_unpacked_bytes:
                        raise _Abort(f"the archive inflates past {settings.max_dataset_unpacked_bytes} bytes")
                    if written > RATIO_FLOOR and written / max(info.compress_size, 1) > settings.max_compression_ratio:
                        raise _Abort(f"compression ratio exceeds {settings.max_compression_ratio:g} (zip bomb?)")
                    out.write(block)
        except _Abort as exc:
            problems.add(info.filename, str(exc))
            break  # a bomb: stop inflating anything else
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            problems.add(info.filename, f"cannot be extracted: {exc}")
    problems.raise_if_any()
    return total


def verify_images(plan, dest: Path, settings) -> None:
    """Decode every image fully (verify + load) under the pixel limit; one detail per bad entry."""
    problems = _Problems()
    for info, cls, filename in plan:
        why = image_problem(dest / cls / filename, settings.max_image_pixels)
        if why:
            problems.add(info.filename, why)
    problems.raise_if_any()


def image_problem(path: Path, max_pixels: int) -> str | None:
    """Why PIL cannot use this file as an image, or None."""
    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
            if width * height > max_pixels:
                return f"image is {width}x{height}, more than {max_pixels} pixels (decompression bomb?)"
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: reopen to decode pixels
            im.load()
    except Image.UnidentifiedImageError:
        return "not an image PIL can read"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"more than {max_pixels} pixels (decompression bomb?)"
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input; all mean "corrupt"
        return f"truncated or corrupt image ({type(exc).__name__}: {exc})"
    return None


def _counts(classes: set[str], plan) -> dict[str, int]:
    counts = {c: 0 for c in classes}
    for _, cls, _ in plan:
        counts[cls] += 1
    problems = _Problems()
    if len(counts) < 2:
        problems.add("*", f"found {len(counts)} class folder(s) ({', '.join(sorted(counts)) or 'none'}); "
                          "need at least 2: <class>/<image>")
    for cls, n in sorted(counts.items()):
        if n == 0:
            problems.add(cls + "/", "class folder has no images")
    problems.raise_if_any()
    return dict(sorted(counts.items()))


def _seekable(fileobj, scratch: Path):
    """A seekable file for zipfile: the upload itself, or a copy of a raw stream in scratch."""
    try:
        if fileobj.seekable():
            fileobj.seek(0)
            return fileobj
    except (AttributeError, OSError):
        pass
    copy = open(scratch / "upload.zip", "w+b")
    shutil.copyfileobj(fileobj, copy, CHUNK)  # the web layer bounds the stream (413 beyond max_request_bytes)
    copy.seek(0)
    return copy


def _check_entry_count(src, settings) -> None:
    # Millions of tiny central-directory records would cost GBs of ZipInfo objects: read the
    # count from the end record first (zipfile's private reader, stable since Python 2).
    try:
        end = zipfile._EndRecData(src)
        entries = end[zipfile._ECD_ENTRIES_TOTAL] if end else 0
    except (OSError, ValueError, IndexError, struct.error):
        entries = 0
    allowed = 2 * settings.max_dataset_files + 1000  # room for folder entries and macOS junk
    if entries > allowed:
        raise InvalidInput(f"the zip has {entries} entries; the limit is {settings.max_dataset_files} files",
                           [{"entry": "*", "message": f"{entries} entries"}], code="invalid_dataset")


def check_and_extract(fileobj, settings, scratch: Path) -> tuple[Path, dict[str, int], int]:
    """Run every check on the upload, leaving the images in scratch/tree; (tree, counts, bytes)."""
    src = _seekable(fileobj, scratch)
    try:
        if not zipfile.is_zipfile(src):
            raise InvalidInput("the upload is not a zip archive; zip a folder laid out as <class>/<image>",
                               [{"entry": "*", "message": "not a zip archive"}], code="not_a_zip")
        _check_entry_count(src, settings)
        src.seek(0)
        try:
            zf = zipfile.ZipFile(src)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise InvalidInput(f"the zip archive is corrupt: {exc}", [{"entry": "*", "message": str(exc)}],
                               code="not_a_zip") from None
        with zf:
            plan, classes = plan_zip(zf, settings)
            tree = scratch / "tree"
            tree.mkdir()
            size = extract(zf, plan, tree, settings)
        verify_images(plan, tree, settings)
        return tree, _counts(classes, plan), size
    finally:
        if src is not fileobj:
            src.close()


# ---------------------------------------------------------------- store + storage

def _row(row) -> dict:
    return {"id": row.id, "name": row.name, "classes": list(row.classes), "counts": dict(row.counts),
            "num_images": row.num_images, "size": row.size, "created_at": iso(row.created_at)}


def _default_name(filename: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", PurePosixPath((filename or "").replace("\\", "/")).stem).strip("-.")
    return stem[:64] or "dataset"


def _store_tree(storage, tree: Path, dataset_id: str) -> None:
    """Move the checked folder to datasets/<id>: one rename on local storage, an upload elsewhere."""
    prefix = f"datasets/{dataset_id}"
    local = storage.local_path(prefix)
    if local is None:
        try:
            storage.put_dir(str(tree), prefix)
        except BaseException:
            storage.delete(prefix)
            raise
        return
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tree, local)  # atomic: readers see all of the dataset or none of it
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staging = local.with_name(f".{dataset_id}.incoming")  # another filesystem: copy, then rename
        try:
            shutil.copytree(tree, staging)
            os.rename(staging, local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _scratch_parent(storage, settings) -> Path:
    # Inside local storage (not under datasets/), so the final move is a same-filesystem rename.
    root = storage.local_path()
    parent = Path(root) / ".incoming" if root is not None else settings.cache_path / "incoming"
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def create_dataset(kiln, fileobj, filename: str, name: str | None = None) -> dict:
    """Check an uploaded ImageFolder zip, store it under datasets/<id>/ and insert its row.

    ``kiln`` is the facade (worker.service.Kiln): its ``engine``, ``storage`` and ``settings`` are used.
    """
    from worker import db

    engine, storage, settings = kiln.engine, kiln.storage, kiln.settings
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=_scratch_parent(storage, settings)))
    try:
        tree, counts, size = check_and_extract(fileobj, settings, scratch)
        dataset_id = uuid.uuid4().hex
        row = {"id": dataset_id, "name": name or _default_name(filename), "classes": list(counts),
               "counts": counts, "num_images": sum(counts.values()), "size": size,
               "created_at": utcnow()}
        _store_tree(storage, tree, dataset_id)
        try:
            with engine.begin() as conn:
                conn.execute(db.datasets.insert().values(**row))
        except BaseException:
            _remove(storage, dataset_id)  # the row is the source of truth: no row, no files
            raise
        return {**row, "created_at": iso(row["created_at"])}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove(storage, dataset_id: str) -> None:
    storage.delete(f"datasets/{dataset_id}")


def list_datasets(kiln) -> list[dict]:
    """Every uploaded dataset, newest first."""
    from worker import db

    with kiln.engine.connect() as conn:
        rows = conn.execute(db.datasets.select().order_by(db.datasets.c.created_at.desc(), db.datasets.c.id))
        return [_row(r) for r in rows]


def get_dataset(kiln, dataset_id: str) -> dict:
    """One uploaded dataset by id; NotFound names the id."""
    from worker import db

    row = None
    if is_id(dataset_id):
        with kiln.engine.connect() as conn:
            row = conn.execute(db.datasets.select().where(db.datasets.c.id == dataset_id)).first()
    if row is None:
        raise NotFound(f"no dataset {dataset_id!r}; GET /v1/datasets lists the uploaded ones")
    return _row(row)
