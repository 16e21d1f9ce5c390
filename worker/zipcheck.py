"""Checking an uploaded ImageFolder zip before anything is stored, on a bounded per-process pool.

The central directory is walked record by record before zipfile builds an object per entry
(a lying count cannot cost memory); declared sizes are checked before a byte is inflated
(count, total size, total and per-entry compression ratio, unsafe names, symlinks), then
enforced again while extracting into a scratch folder (headers can lie), then every image is
decoded under a pixel limit, in the formats ml.images reads. ``UploadSlots`` runs the checks
off the request thread with a time limit, so concurrent uploads cannot take every core.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import struct
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path, PurePosixPath

from ml.folders import IMAGE_EXTENSIONS, is_image
from ml.images import ImageError, load_image, open_image
from worker.errors import InvalidInput, PayloadTooLarge, TooManyRequests, Unavailable

RATIO_FLOOR = 1 << 20  # one entry under 1 MiB inflated can't bomb anyone; a flat-colour BMP may compress 1000x
# ... but thousands of them can: the whole archive may inflate to this much whatever its ratio, and
# beyond it to at most max_compression_ratio times its compressed bytes.
TOTAL_RATIO_FLOOR = 64 << 20
MAX_DETAILS = 50
CHUNK = 1 << 20
# Uploads checked at once per web process (each inflates and decodes on one core), and for how long.
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


def plan_zip(zf: zipfile.ZipFile, settings, archive_size: int | None = None
             ) -> tuple[list[tuple[zipfile.ZipInfo, str, str]], set[str]]:
    """Check declared facts; return [(info, class, filename)] to extract and the set of class folders."""
    if archive_size is None:
        archive_size = zf.fp.seek(0, os.SEEK_END) if zf.fp is not None else 0
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
    packed = min(sum(info.compress_size for info, _ in files), archive_size)
    if total > max(TOTAL_RATIO_FLOOR, settings.max_compression_ratio * packed):
        problems.add("*", f"unpacks to {total} bytes from {packed} compressed bytes, a ratio over "
                          f"{settings.max_compression_ratio:g} (zip bomb?)")
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


class _Stopped(Exception):
    """The upload ran past its time limit; the pool thread stops at the next chunk or image."""


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise _Stopped()


def extract(zf: zipfile.ZipFile, plan, dest: Path, settings, stop: threading.Event | None = None) -> int:
    """Inflate the planned entries into dest/<class>/<file>, enforcing sizes on actual bytes; total bytes.

    Each entry may not inflate past its declared size, so the running total never passes the
    declared total that plan_zip accepted, whatever the headers claimed.
    """
    problems, total = _Problems(), 0
    for info, cls, filename in plan:
        target, written = dest / cls / filename, 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while block := src.read(CHUNK):
                    _check_stop(stop)
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
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # our disk, not the client's data
                raise Unavailable("no scratch space left to check the upload; retry later") from None
            problems.add(info.filename, f"cannot be extracted: {exc}")
        except _Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - zlib.error, lzma.LZMAError, EOFError, BadZipFile (CRC)...
            problems.add(info.filename, f"cannot be extracted: corrupt data ({type(exc).__name__}: {exc})"[:300])
    problems.raise_if_any()
    return total


def verify_images(plan, dest: Path, settings, stop: threading.Event | None = None) -> None:
    """Decode every image fully (verify + load) under the pixel limit; one detail per bad entry."""
    problems = _Problems()
    for info, cls, filename in plan:
        _check_stop(stop)
        why = image_problem(dest / cls / filename, settings.max_image_pixels)
        if why:
            problems.add(info.filename, why)
    problems.raise_if_any()


def image_problem(path: Path, max_pixels: int) -> str | None:
    """Why Kiln cannot use this file as an image (format outside ml.images.FORMATS, too many
    pixels, corrupt or truncated data), or None."""
    try:
        with open(path, "rb") as f, open_image(f, max_pixels, where="image") as im:  # header only
            im.verify()  # checksums (PNG CRCs) without keeping pixels
        with open(path, "rb") as f, open_image(f, max_pixels, where="image") as im:
            load_image(im)  # verify() leaves the image unusable: reopen to decode every pixel
    except ImageError as exc:
        return str(exc).removeprefix("image: ")
    except Exception as exc:  # noqa: BLE001 - verify() raises many types on hostile input; all mean "corrupt"
        return f"truncated or corrupt image ({type(exc).__name__}: {exc})"[:300]
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


def seekable(fileobj, scratch: Path):
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


def _corrupt(message: str) -> InvalidInput:
    return InvalidInput(f"the zip archive is corrupt: {message}", [{"entry": "*", "message": message}],
                        code="not_a_zip")


def scan_central_directory(src, settings) -> int:
    """Walk the central directory's records (46 fixed bytes + name, extra, comment each) without
    building them, before zipfile does; the number of records, or InvalidInput.

    zipfile reads every record whatever the end record's count says, and a ZipInfo costs about a
    KiB: a few MB of tiny records would cost GBs. Zip64 end records spanning several disks and
    offsets outside the file are refused here too.
    """
    allowed = 2 * settings.max_dataset_files + 1000  # room for folder entries and macOS junk
    try:
        end = zipfile._EndRecData(src)  # zipfile's private reader, stable since Python 2
    except zipfile.BadZipFile as exc:  # e.g. "zipfiles that span multiple disks are not supported"
        raise _corrupt(str(exc)) from None
    except (OSError, ValueError, IndexError, struct.error) as exc:
        raise _corrupt(f"unreadable end of central directory ({type(exc).__name__})") from None
    if not end:
        raise InvalidInput("the upload is not a zip archive; zip a folder laid out as <class>/<image>",
                           [{"entry": "*", "message": "not a zip archive"}], code="not_a_zip")
    declared, size_cd, offset_cd = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]
    if declared > allowed:
        raise InvalidInput(f"the zip has {declared} entries; the limit is {settings.max_dataset_files} files",
                           [{"entry": "*", "message": f"{declared} entries"}], code="invalid_dataset")
    concat = end[zipfile._ECD_LOCATION] - size_cd - offset_cd
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    start = offset_cd + concat
    if start < 0 or size_cd < 0 or start + size_cd > end[zipfile._ECD_LOCATION]:
        raise _corrupt("the central directory lies outside the file")
    src.seek(start)
    count, pos = 0, 0
    while pos < size_cd:
        head = src.read(zipfile.sizeCentralDir)
        if len(head) != zipfile.sizeCentralDir or head[:4] != zipfile.stringCentralDir:
            raise _corrupt(f"bad central directory record {count + 1}")
        count += 1
        if count > allowed:
            raise InvalidInput(f"the zip's central directory holds more than {allowed} records (its end record "
                               f"says {declared}); the limit is {settings.max_dataset_files} files",
                               [{"entry": "*", "message": f"more than {allowed} entries"}], code="invalid_dataset")
        name_len, extra_len, comment_len = struct.unpack("<3H", head[28:34])
        skip = name_len + extra_len + comment_len
        src.seek(skip, os.SEEK_CUR)
        pos += zipfile.sizeCentralDir + skip
    return count


def check_and_extract(fileobj, settings, scratch: Path, stop: threading.Event | None = None
                      ) -> tuple[Path, dict[str, int], int]:
    """Run every check on the upload, leaving the images in scratch/tree; (tree, counts, bytes)."""
    src = seekable(fileobj, scratch)
    try:
        size = src.seek(0, os.SEEK_END)
        scan_central_directory(src, settings)
        src.seek(0)
        try:
            zf = zipfile.ZipFile(src)
        except Exception as exc:  # noqa: BLE001 - BadZipFile, OSError, ValueError, struct.error...
            raise _corrupt(str(exc) or type(exc).__name__) from None
        with zf:
            plan, classes = plan_zip(zf, settings, size)
            tree = scratch / "tree"
            tree.mkdir()
            unpacked = extract(zf, plan, tree, settings, stop)
        verify_images(plan, tree, settings, stop)
        return tree, _counts(classes, plan), unpacked
    finally:
        if src is not fileobj:
            src.close()


class UploadSlots:
    """The per-process pool that checks uploads, and its admission: a full pool answers 429 at
    once, before the body is read, instead of queueing uploads behind each other."""

    def __init__(self, workers: int, timeout_s: float):
        self.workers, self.timeout_s = max(1, workers), timeout_s
        self._free = threading.BoundedSemaphore(self.workers)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self):
        """Hold one of the pool's places for the length of a request; TooManyRequests when none is free."""
        if not self._free.acquire(blocking=False):
            raise TooManyRequests(f"{self.workers} dataset uploads are being checked on this web process; "
                                  "retry shortly", {"limit": self.workers}, code="too_many_uploads")
        try:
            yield
        finally:
            self._free.release()

    def run(self, fn, *args):
        """fn(*args, stop) on the pool, waited for up to timeout_s; then ``stop`` is set and the
        upload refused with 413 once fn has stopped (at its next chunk or image)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kiln-upload")
        stop = threading.Event()
        future = self._pool.submit(fn, *args, stop)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            stop.set()
            try:
                future.result()
            except (_Stopped, Exception):  # noqa: BLE001 - whatever it was doing, the answer is the timeout
                pass
            raise PayloadTooLarge(f"checking the upload took longer than {self.timeout_s:g} s; upload fewer "
                                  "or smaller images at a time", code="upload_too_slow") from None


_slots: dict[tuple[int, float], UploadSlots] = {}
_slots_lock = threading.Lock()


def upload_slots(settings) -> UploadSlots:
    """This process's UploadSlots for these settings (workers and time limit)."""
    key = (settings.dataset_upload_workers, settings.dataset_check_timeout_s)
    with _slots_lock:
        if key not in _slots:
            _slots[key] = UploadSlots(*key)
        return _slots[key]
