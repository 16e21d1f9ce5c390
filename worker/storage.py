"""Artifact storage over fsspec: a local directory by default, any fsspec URL (s3://, gs://...) otherwise.

Paths are relative POSIX paths (``jobs/<id>/train.log``); anything that could escape
the root (``..``, absolute paths, backslashes, NUL) is refused. Writes are atomic:
``ml.files.atomic_write`` locally; object stores write whole objects anyway.

Several hosts share one bucket, so nothing here trusts a listing made earlier: the filesystem is
built with ``use_listings_cache=False`` (every list, info and exists asks the store), which also
keeps a reader's ``open`` from checking a file against an ETag another host has since replaced.

Each artifact's sha256 is recorded when it is written: a prefix's ``.sha256.json`` maps each
name to its sha256, size and version (S3's ETag, a local file's mtime). ``list`` trusts an entry
only while the object's size and version match, and hashes the body otherwise.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path

import fsspec

from ml.files import TEMP_PREFIX, atomic_write
from worker.errors import InvalidInput, Unavailable

CHUNK = 1 << 20
INDEX = ".sha256.json"  # per prefix: {name: {"sha256", "size", "version"}}
ATTEMPTS = 5  # a listing or a read raced by writers from other hosts is taken again this often


def clean_path(path: str) -> str:
    """Normalise a relative storage path; InvalidInput if it is absolute or escapes the root."""
    if not isinstance(path, str) or "\x00" in path or "\\" in path:
        raise InvalidInput(f"invalid path {path!r}: use '/'-separated relative paths")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise InvalidInput(f"invalid path {path!r}: absolute paths are not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"invalid path {path!r}: '..' is not allowed")
    return "/".join(parts)


def sha256_file(fileobj) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fileobj.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def _version(info: dict):
    """What changes whenever an object is rewritten: S3's ETag, else the modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            value = info[key]
            if hasattr(value, "timestamp"):  # some filesystems give datetimes in info, floats in find
                value = value.timestamp()
            return value if isinstance(value, (str, int, float)) else str(value)
    return None


class Storage:
    """Files under one root (local directory or fsspec URL)."""

    def __init__(self, url: str | os.PathLike):
        url = str(url)
        self.url = url
        # no listing cache: another host may write between this process's listings and reads
        self.fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols
        self.root = str(Path(root).resolve()) if self.is_local else root.rstrip("/")
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _full(self, path: str) -> str:
        rel = clean_path(path)
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, path: str = "") -> Path | None:
        """The local filesystem path of ``path`` when storage is a local directory, else None."""
        return Path(self._full(path)) if self.is_local else None

    def open(self, path: str, mode: str = "rb"):
        full = self._full(path)
        if "w" in mode or "a" in mode:
            self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        return self.fs.open(full, mode)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` atomically: readers see the old file or the new one, never a torn one."""
        full = self._full(path)
        if not self.is_local:
            with self.fs.open(full, "wb") as f:
                f.write(data)
            return
        atomic_write(full, data)

    def read_bytes(self, path: str, offset: int = 0, limit: int = -1) -> bytes:
        """``limit`` bytes (-1: all) of ``path`` from ``offset``.

        An object another host replaces while it is read (s3fs raises FileExpired, an OSError with
        EBUSY) is read again, in its new version; one that keeps changing is a 503, not a 500.
        """
        full = self._full(path)
        for _ in range(ATTEMPTS):
            try:
                with self.fs.open(full, "rb") as f:
                    if offset:
                        f.seek(offset)
                    return f.read(limit)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                self.fs.invalidate_cache(full)  # the size and ETag s3fs remembered are the old object's
        raise Unavailable(f"{path} kept changing while it was read; try again")

    def put_file(self, local: str | os.PathLike, path: str) -> None:
        """Copy a local file into storage (atomically when storage is local)."""
        full = self._full(path)
        if not self.is_local:
            self.fs.put_file(str(local), full)
            return
        with open(local, "rb") as src:
            atomic_write(full, lambda dst: shutil.copyfileobj(src, dst, CHUNK))

    def upload(self, local: str | os.PathLike, path: str) -> dict:
        """Copy one local file into storage, hashing what it sends: the entry ``record`` takes.

        The file is read from one open descriptor, so a file replaced meanwhile (an atomic
        rename) is sent whole in its old version; ``stat`` is that version's os.fstat.
        """
        full = self._full(path)
        h = hashlib.sha256()
        with open(local, "rb") as src:
            stat = os.fstat(src.fileno())

            def copy(dst) -> None:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)

            if self.is_local:
                atomic_write(full, copy)
            else:
                self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
                with self.fs.open(full, "wb") as dst:
                    copy(dst)
        return {"sha256": h.hexdigest(), "size": stat.st_size,
                "version": _version(self.fs.info(full)), "stat": (stat.st_size, stat.st_mtime_ns)}

    def record(self, prefix: str, entries: dict[str, dict]) -> None:
        """Merge {name: {"sha256", "size", "version"}} into ``prefix``'s record of checksums.

        One writer per prefix at a time (the job's fenced holder, or the submitter before it).
        """
        if not entries:
            return
        index = self._read_index(prefix)
        index.update({name: {k: e[k] for k in ("sha256", "size", "version")} for name, e in entries.items()})
        self.write_bytes(f"{prefix}/{INDEX}", json.dumps(index, sort_keys=True).encode())

    def entry(self, path: str, sha256: str, size: int) -> dict:
        """The record entry of a file already in storage whose sha256 the caller computed."""
        return {"sha256": sha256, "size": size, "version": _version(self.fs.info(self._full(path)))}

    def write_recorded(self, prefix: str, name: str, data: bytes) -> None:
        """write_bytes(prefix/name) and record its sha256."""
        path = f"{prefix}/{name}"
        self.write_bytes(path, data)
        self.record(prefix, {name: self.entry(path, hashlib.sha256(data).hexdigest(), len(data))})

    def _read_index(self, prefix: str) -> dict:
        try:
            index = json.loads(self.read_bytes(f"{prefix}/{INDEX}"))
        except (FileNotFoundError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def put_dir(self, local_dir: str | os.PathLike, prefix: str) -> int:
        """Upload every file under ``local_dir`` to ``prefix``/...; returns the number of files."""
        local_dir = Path(local_dir)
        count = 0
        for p in sorted(local_dir.rglob("*")):
            if p.is_file() and not p.name.startswith(TEMP_PREFIX):
                self.put_file(p, f"{prefix}/{p.relative_to(local_dir).as_posix()}")
                count += 1
        return count

    def get_dir(self, prefix: str, local_dir: str | os.PathLike) -> int:
        """Download every file under ``prefix`` into ``local_dir`` (remote storage -> worker cache)."""
        count = 0
        for item in self.list(prefix, checksums=False):
            dest = Path(local_dir) / item["name"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._full(f"{prefix}/{item['name']}"), str(dest))
            count += 1
        return count

    def exists(self, path: str) -> bool:
        return self.fs.exists(self._full(path))

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(self._full(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(self._full(path)))

    def list(self, prefix: str, checksums: bool = True) -> list[dict]:
        """Files under ``prefix``: [{name (relative to prefix), size, sha256}], sorted by name.

        sha256 comes from the prefix's record when it matches the object; only unrecorded or
        changed objects are read and hashed.
        """
        for attempt in range(ATTEMPTS):
            try:
                return self._list_once(prefix, checksums)
            except OSError:
                # Another host replaced or removed an object between the listing and its read
                # (s3fs raises FileExpired, local disk FileNotFoundError): list again.
                if attempt == ATTEMPTS - 1:
                    raise Unavailable(f"the files under {prefix} kept changing while they were listed; "
                                      "try again") from None
        return []

    def _list_once(self, prefix: str, checksums: bool) -> list[dict]:
        base = self._full(prefix)
        found = self.fs.find(base, detail=True)
        if not found:
            return []
        index = self._read_index(prefix) if checksums and f"{base}/{INDEX}".lstrip("/") in {
            k.lstrip("/") for k in found} else {}
        out = []
        for full, info in sorted(found.items()):
            if info.get("type") != "file":
                continue
            name = posixpath.relpath(full if self.is_local else full.lstrip("/"),
                                     base if self.is_local else base.lstrip("/"))
            if posixpath.basename(name).startswith(TEMP_PREFIX) or name == INDEX:
                continue  # an atomic write in progress; the record of checksums
            item = {"name": name, "size": int(info.get("size") or 0)}
            known = index.get(name) or {}
            if checksums and known.get("size") == item["size"] and known.get("version") == _version(info):
                item["sha256"] = known["sha256"]
            elif checksums:
                with self.fs.open(full, "rb") as f:
                    item["sha256"] = sha256_file(f)
            out.append(item)
        return out

    def delete(self, prefix: str) -> None:
        full = self._full(prefix)
        if full == self.root:
            raise InvalidInput("refusing to delete the whole storage root")
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)
