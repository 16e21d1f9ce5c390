"""Model registry: immutable numbered versions of named models, and movable aliases.

A version is a finished job's best (or last) checkpoint, slimmed to what serving
needs and stored as models/<name>/<version>/model.pt (weights_only-loadable),
model.safetensors (weights), model.onnx when ONNX Runtime serves it, and card.json
(classes, normalisation, config, metrics, sha256, source job, and the runtime that
serves it with the measurements that chose it). Version numbers come from a unique (name, version)
constraint plus retry, so concurrent registrations never share a number. Only
``write_artifacts`` imports torch; the web tier runs it in its forward process
(``Registry.register_model(build=...)``), so the facade and web processes stay torch-free.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from configs.names import MAX_VERSION, NAME_RE, SERVING_RUNTIMES, is_id, parse_model_ref
from ml.files import atomic_write
from worker import db
from worker.clock import iso, utcnow
from worker.errors import Conflict, InvalidInput, NotFound
from worker.storage import Storage, sha256_file

DEFAULT_ALIAS = "production"  # what a bare "name" resolves to when set; else the latest version
SLIM_KEYS = ("config", "classes", "normalization", "image_size", "in_channels", "metrics", "best", "versions")


RETIRED = ".retired"  # models/<name>/.retired: {"version": the highest deleted version}


def retired_version(storage, name: str) -> int:
    """The highest version of ``name`` ever deleted (0: none): the registry numbers new versions above it."""
    try:
        value = json.loads(storage.read_bytes(f"models/{name}/{RETIRED}")).get("version")
    except (FileNotFoundError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def model_prefix(name: str, version: int) -> str:
    return f"models/{name}/{version}"


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """'name' | 'name:3' | 'name@production' -> (name, version or None, alias or None); InvalidInput otherwise."""
    parsed = parse_model_ref(ref)
    if parsed is None:
        raise InvalidInput(f"model reference {_shown(ref)} must be name, name:version or name@alias",
                           [{"field": "model", "message": f"must match {NAME_RE} with :version or @alias"}])
    return parsed


def is_name(value) -> bool:
    """Whether ``value`` can name a model or an alias (checked before any query: PostgreSQL refuses NUL)."""
    return isinstance(value, str) and re.fullmatch(NAME_RE, value) is not None


def _check_name(value, what: str) -> None:
    if not is_name(value):
        raise InvalidInput(f"{what} {_shown(value)} must be 1-64 letters, digits, '_', '.' or '-' "
                           "(starting with a letter or digit)", [{"field": what, "message": f"must match {NAME_RE}"}])


def _check_version(version) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidInput("version must be an integer", [{"field": "version", "message": "must be an integer"}])
    if not 1 <= version <= MAX_VERSION:
        shown = version if abs(version) < 10**12 else f"a {len(str(abs(version)))}-digit number"
        raise InvalidInput(f"version must be between 1 and {MAX_VERSION}, got {shown}",
                           [{"field": "version", "message": f"must be between 1 and {MAX_VERSION}"}])


def _shown(value) -> str:
    """A client's value for an error message: repr, cut short (NULs and newlines escaped)."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def serving_runtimes(settings) -> list[str]:
    """settings.serving_runtimes as a list, each name checked (InvalidInput names an unknown one)."""
    names = [n.strip() for n in settings.serving_runtimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVING_RUNTIMES]
    if unknown:
        raise InvalidInput(f"KILN_SERVING_RUNTIMES names unknown runtime(s) {', '.join(unknown)} "
                           f"(known: {', '.join(SERVING_RUNTIMES)})")
    return names


def write_artifacts(src: str | Path, out_dir: str | Path, *, name: str, job_id: str | None,
                    checkpoint: str, runtimes: list[str] | None = None) -> dict:
    """A training checkpoint file -> model.pt, model.safetensors (and model.onnx) in ``out_dir``; the card (no version).

    ``runtimes``: the candidates measured against eager (``ml.runtimes.DEFAULT_CANDIDATES`` when None).
    """
    import torch
    from safetensors.torch import save_file

    from ml.checkpoint import load_checkpoint

    ckpt = load_checkpoint(src, map_location="cpu")
    missing = [k for k in ("model", "config", "classes", "normalization") if k not in ckpt]
    if missing:
        raise InvalidInput(f"checkpoint lacks {', '.join(missing)}; it is not a Kiln training checkpoint")
    slim = {"format": ckpt.get("format", "kiln.checkpoint/1"), "kind": "model", "model": ckpt["model"],
            **{k: ckpt[k] for k in SLIM_KEYS if k in ckpt}, "epoch": ckpt.get("epoch"), "step": ckpt.get("step")}
    out = Path(out_dir)
    torch.save(slim, out / "model.pt")
    # safetensors refuses shared storage; clone gives each tensor its own.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()},
              out / "model.safetensors")
    with open(out / "model.pt", "rb") as f:
        sha256 = sha256_file(f)
    runtime = _build_runtime(slim, out, sha256, runtimes)
    files = ["model.pt", "model.safetensors", *([runtime["file"]] if runtime.get("file") else []), "card.json"]
    return {"name": name, "classes": list(ckpt["classes"]), "normalization": ckpt["normalization"],
            "image_size": ckpt.get("image_size"), "in_channels": ckpt.get("in_channels"),
            "config": ckpt["config"], "metrics": ckpt.get("metrics") or {}, "best": ckpt.get("best") or {},
            "epoch": ckpt.get("epoch"), "source": {"job_id": job_id, "checkpoint": checkpoint},
            "sha256": sha256, "runtime": runtime, "files": files}


def _build_runtime(slim: dict, out: Path, sha256: str, candidates) -> dict:
    """The card's ``runtime``: ml.runtimes' measured choice, or eager with the reason nothing else could be built."""
    from ml import runtimes
    from ml.inference import Predictor

    try:
        return runtimes.build(Predictor.from_state(slim), out, runtimes.DEFAULT_CANDIDATES if candidates is None
                              else tuple(candidates), weights_sha256=sha256)
    except Exception as exc:  # noqa: BLE001 - the version still serves, with eager, and its card says why
        (out / runtimes.ONNX_FILE).unlink(missing_ok=True)
        return {"name": "eager", "file": None, "reason": f"the runtime build failed ({type(exc).__name__}: "
                                                         f"{str(exc)[:300]}); eager serves"}


class Registry:
    """Registry operations over the job store's tables and the artifact Storage."""

    def __init__(self, engine: sa.Engine, storage, *, cache_dir: str | Path, max_retries: int = 20,
                 runtimes: list[str] | None = None):
        self.engine, self.storage = engine, storage
        self.runtimes = runtimes  # candidates measured at registration; None = ml.runtimes' default
        self.cache_dir = Path(cache_dir)
        self.versions, self.aliases, self.jobs = db.model_versions, db.model_aliases, db.jobs
        self.max_retries = max_retries

    @classmethod
    def from_settings(cls, settings, *, engine: sa.Engine | None = None, storage=None) -> "Registry":
        """A Registry on the settings' job store and artifact storage (pass the facade's if it has them)."""
        return cls(engine if engine is not None else db.make_engine(settings),
                   storage if storage is not None else Storage(settings.storage), cache_dir=settings.cache_path,
                   runtimes=serving_runtimes(settings))

    # ------------------------------------------------------------- register
    def register_model(self, name: str, job_id: str, checkpoint: str = "best", *, build=write_artifacts,
                       gate: dict | None = None) -> dict:
        """Register a succeeded job's checkpoint as the next version of ``name``; returns the version.

        ``build`` has ``write_artifacts``'s signature; the web tier passes one that runs it in its
        forward process. ``gate``: the register gate and the metrics it saw (worker.promote), kept on the version.
        """
        _check_name(name, "name")
        if not is_id(job_id):
            raise InvalidInput(f"job_id {_shown(job_id)} is not a job id (32 lowercase hex digits)",
                               [{"field": "job_id", "message": "must be a job id (32 lowercase hex digits)"}])
        if checkpoint not in ("best", "last"):
            raise InvalidInput(f"checkpoint must be best or last, got {_shown(checkpoint)}",
                               [{"field": "checkpoint", "message": "must be best or last"}])
        with self.engine.connect() as conn:
            job = conn.execute(sa.select(self.jobs.c.status, self.jobs.c.kind)
                               .where(self.jobs.c.id == job_id)).first()
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.kind != "train":
            raise Conflict(f"job {job_id} is a {job.kind} job; only training jobs produce models")
        if job.status != "succeeded":
            raise Conflict(f"job {job_id} is {job.status}; only a succeeded job can be registered")
        path = f"jobs/{job_id}/checkpoints/{checkpoint}.pt"
        if not self.storage.exists(path):
            raise NotFound(f"job {job_id} has no {checkpoint} checkpoint ({path}); "
                           + ("try checkpoint=last" if checkpoint == "best" else "it may have been deleted"))
        with self._local_copy(path) as local:
            return self.register_checkpoint(name, local, job_id=job_id, checkpoint=checkpoint, build=build, gate=gate)

    def register_checkpoint(self, name: str, path: str | Path, *, job_id: str | None = None,
                            checkpoint: str = "best", build=write_artifacts, gate: dict | None = None) -> dict:
        """Register a local checkpoint file as the next version of ``name`` (no job checks)."""
        _check_name(name, "name")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix="register-") as out:
            card = build(str(path), out, name=name, job_id=job_id, checkpoint=checkpoint, runtimes=self.runtimes)
            return self._insert_version(name, job_id, checkpoint, Path(out), card, gate)

    def _insert_version(self, name, job_id, checkpoint, built: Path, card, gate: dict | None = None) -> dict:
        for _ in range(self.max_retries):
            created = utcnow()
            try:
                # The uncommitted row reserves (name, version): a concurrent insert of the same
                # number waits for us and then fails the unique constraint, so only this
                # transaction ever writes models/<name>/<version>/.
                with self.engine.begin() as conn:
                    latest = conn.execute(sa.select(sa.func.max(self.versions.c.version))
                                          .where(self.versions.c.name == name)).scalar()
                    version = max(latest or 0, retired_version(self.storage, name)) + 1  # never reused
                    card = {**card, "version": version, "created_at": iso(created)}
                    conn.execute(self.versions.insert().values(
                        name=name, version=version, job_id=job_id, checkpoint=checkpoint,
                        card=card, sha256=card["sha256"], created_at=created, gate=gate))
                    prefix = model_prefix(name, version)
                    self.storage.put_file(built / "model.pt", f"{prefix}/model.pt")
                    self.storage.put_file(built / "model.safetensors", f"{prefix}/model.safetensors")
                    runtime_file = (card.get("runtime") or {}).get("file")
                    if runtime_file:
                        self.storage.put_file(built / runtime_file, f"{prefix}/{runtime_file}")
                    self.storage.write_bytes(f"{prefix}/card.json", json.dumps(card, indent=2).encode())
            except IntegrityError:
                continue
            except OperationalError as exc:  # SQLite: a concurrent writer held the lock too long
                if "locked" not in str(exc):
                    raise
                time.sleep(0.05)
                continue
            return self.get_version(name, version)
        raise Conflict(f"could not allocate a version of {name} after {self.max_retries} attempts; retry")

    # ------------------------------------------------------------------ read
    def _version_dict(self, row, aliases: list[str]) -> dict:
        card = row.card or {}
        return {"name": row.name, "version": row.version, "job_id": row.job_id, "checkpoint": row.checkpoint,
                "sha256": row.sha256, "created_at": iso(row.created_at), "aliases": sorted(aliases),
                "metrics": card.get("metrics", {}), "best": card.get("best", {}), "classes": card.get("classes"),
                "model": (card.get("config") or {}).get("model", {}).get("name"), "gate": row.gate}

    def get_version(self, name: str, version: int) -> dict:
        return next(v for v in self.get_model(name)["versions"] if v["version"] == version)

    def list_models(self) -> dict:
        """Every model: versions (with metrics) and aliases, names in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.versions).order_by(self.versions.c.name, self.versions.c.version)).all()
            alias_rows = conn.execute(sa.select(self.aliases)).all()
        return {"models": [self._model_dict(name, rows, alias_rows) for name in dict.fromkeys(r.name for r in rows)]}

    def get_model(self, name: str) -> dict:
        """One model with its versions and aliases; NotFound when it has no version."""
        if not is_name(name):
            raise NotFound(f"model {_shown(name)} not found: a model name is 1-64 letters, digits, '_', '.' "
                           "or '-'", code="bad_model_name")
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.versions).where(self.versions.c.name == name)
                                .order_by(self.versions.c.version)).all()
            alias_rows = conn.execute(sa.select(self.aliases).where(self.aliases.c.name == name)).all()
        if not rows:
            raise NotFound(f"model {name!r} not found; register one with POST /v1/models")
        return self._model_dict(name, rows, alias_rows)

    def _model_dict(self, name: str, rows, alias_rows) -> dict:
        aliases = {a.alias: a.version for a in alias_rows if a.name == name}
        versions = [self._version_dict(r, [a for a, v in aliases.items() if v == r.version])
                    for r in rows if r.name == name]
        return {"name": name, "latest_version": versions[-1]["version"], "aliases": aliases, "versions": versions}

    # --------------------------------------------------------------- aliases
    def set_alias(self, name: str, alias: str, version: int) -> dict:
        """Point ``alias`` of ``name`` at ``version`` (creating or moving it); returns the model."""
        if not is_name(name):
            raise NotFound(f"model {_shown(name)} not found: a model name is 1-64 letters, digits, '_', '.' "
                           "or '-'", code="bad_model_name")
        _check_name(alias, "alias")
        _check_version(version)
        for _ in range(self.max_retries):
            try:
                with self.engine.begin() as conn:
                    exists = conn.execute(sa.select(self.versions.c.version).where(
                        self.versions.c.name == name, self.versions.c.version == version)).first()
                    if exists is None:
                        self._raise_missing_version(conn, name, version)
                    key = (self.aliases.c.name == name) & (self.aliases.c.alias == alias)
                    updated = conn.execute(self.aliases.update().where(key).values(version=version)).rowcount
                    if not updated:
                        conn.execute(self.aliases.insert().values(name=name, alias=alias, version=version))
            except IntegrityError:  # someone created the same alias at the same moment: update it
                continue
            return self.get_model(name)
        raise Conflict(f"alias {name}@{alias} is being changed concurrently; retry")

    def _raise_missing_version(self, conn, name: str, version: int):
        any_version = conn.execute(sa.select(self.versions.c.version).where(self.versions.c.name == name)
                                   .limit(1)).first()
        if any_version is None:
            raise NotFound(f"model {name!r} not found")
        raise NotFound(f"model {name!r} has no version {version}")

    # --------------------------------------------------------------- resolve
    def resolve_model(self, ref: str) -> dict:
        """'name' | 'name:version' | 'name@alias' -> {name, version, path (local model.pt), card, runtime}."""
        name, version, alias = parse_ref(ref)
        with self.engine.connect() as conn:
            if alias is not None or version is None:
                row = conn.execute(sa.select(self.aliases.c.version).where(
                    self.aliases.c.name == name, self.aliases.c.alias == (alias or DEFAULT_ALIAS))).first()
                if row is None and alias is not None:
                    if not self._has_model(conn, name):
                        raise NotFound(f"model {name!r} not found")
                    raise NotFound(f"model {name!r} has no alias {alias!r}")
                if row is not None:
                    version = row.version
                else:
                    version = conn.execute(sa.select(sa.func.max(self.versions.c.version))
                                           .where(self.versions.c.name == name)).scalar()
                    if version is None:
                        raise NotFound(f"model {name!r} not found")
            vrow = conn.execute(sa.select(self.versions).where(
                self.versions.c.name == name, self.versions.c.version == version)).first()
            if vrow is None:
                self._raise_missing_version(conn, name, version)
        path = self._fetch(name, version, "model.pt", vrow.sha256)
        return {"name": name, "version": version, "path": str(path), "card": vrow.card,
                "runtime": self._runtime(name, version, vrow.card or {})}

    def _runtime(self, name: str, version: int, card: dict) -> dict:
        """{name, path (its local file, if any)} of the runtime the card names; eager when its file is gone."""
        runtime = card.get("runtime") or {"name": "eager"}
        if not runtime.get("file"):
            return {"name": runtime.get("name", "eager"), "path": None}
        try:
            path = self._fetch(name, version, runtime["file"], runtime.get("sha256"))
        except (NotFound, Conflict) as exc:  # still servable: eager, and the forward process logs why
            return {"name": "eager", "path": None, "fallback": exc.message}
        return {"name": runtime["name"], "path": str(path)}

    def _has_model(self, conn, name: str) -> bool:
        return conn.execute(sa.select(self.versions.c.version).where(self.versions.c.name == name)
                            .limit(1)).first() is not None

    def _fetch(self, name: str, version: int, file: str, sha256: str | None) -> Path:
        """Local path of a version's ``file`` (model.pt, model.onnx): in place for local storage, else cached
        (verified against ``sha256``)."""
        path = f"{model_prefix(name, version)}/{file}"
        local = self.storage.local_path(path)
        if local is not None:
            if not Path(local).exists():
                raise NotFound(f"model {name}:{version} is registered but {path} is missing from storage")
            return Path(local)
        target = self.cache_dir / "models" / name / str(version) / file
        if target.exists():
            return target  # versions are immutable: a verified cached copy stays valid
        with self.storage.open(path, "rb") as src:
            data = src.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise Conflict(f"model {name}:{version}: {path} does not match its recorded sha256")
        return atomic_write(target, data)

    def _local_copy(self, path: str):
        """Context manager: a local file for a storage path (temp download for remote storage)."""
        from contextlib import contextmanager

        @contextmanager
        def cm():
            local = self.storage.local_path(path)
            if local is not None:
                yield Path(local)
                return
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.cache_dir, suffix=".pt") as tmp:
                with self.storage.open(path, "rb") as src:
                    tmp.write(src.read())
                tmp.flush()
                yield Path(tmp.name)
        return cm()
