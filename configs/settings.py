"""Service settings: read from the environment in one place, once, at entry points.

Everything else receives a ``Settings`` as an argument. Tests build their own with
``Settings.for_home(tmp_path)`` or ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from configs.paths import split_roots


def _bool(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    # where the embedded default keeps its state (Redis socket, SQLite file, storage)
    home: str = "var"
    # broker + result backend; empty = the embedded Redis on a unix socket under `home`
    redis_url: str = ""
    # job store; empty = SQLite file under `home`
    database_url: str = ""
    # artifact storage (fsspec URL or local path); empty = `home`/storage
    storage_url: str = ""
    # local scratch space for workers (datasets unpacked, remote-storage runs)
    cache_dir: str = ""
    # folders (os.pathsep-separated) a job config may name in data.root or model.weights;
    # empty = none: jobs read uploaded datasets and registered models only
    data_roots: str = ""

    # HTTP limits
    max_request_bytes: int = 256 * 1024 * 1024
    max_dataset_files: int = 100_000
    max_dataset_unpacked_bytes: int = 2 * 1024 * 1024 * 1024
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 40_000_000
    max_predict_images: int = 64
    # uploads checked at once per web process (each may decode thousands of images), and their time limit
    dataset_upload_workers: int = 2
    dataset_check_timeout_s: float = 600.0
    # logs?follow=1 streams per web process (each holds a thread), how long one lasts, how often it polls
    log_follow_streams: int = 2
    log_follow_max_s: float = 600.0
    log_poll_s: float = 0.5
    # seconds a verified (or refused) token is trusted without reading its row again
    token_cache_s: float = 5.0
    # decoded pixels one /predict may hold (sum of width x height; a JSON pixel number counts as one)
    max_predict_pixels: int = 32 * 2**20
    page_size_max: int = 200

    # jobs
    max_attempts: int = 3
    heartbeat_s: float = 5.0
    lease_timeout_s: float = 60.0
    reconcile_every_s: float = 30.0
    progress_every_s: float = 1.0
    # a running job told to cancel that has not stopped after this long is killed (checkpoint kept)
    cancel_grace_s: float = 120.0
    job_soft_time_limit_s: int = 7 * 24 * 3600
    visibility_timeout_s: int = 12 * 3600
    # days a finished job's stored objects are kept (the reconciler removes them; the row stays); 0 = forever
    artifact_ttl_days: float = 0.0
    # how long an Idempotency-Key of POST /v1/jobs or /v1/datasets replays its first answer
    idempotency_ttl_s: float = 24 * 3600.0
    worker_name: str = ""
    # worker: intra-op threads of each job process; 0 = the machine's cores / worker processes
    torch_threads: int = 0

    # serving
    default_model: str = ""
    max_batch_size: int = 32
    # a forming batch waits this long for more inputs; 0 = a batch is whatever waits when a forward worker is free
    max_delay_ms: float = 0.0
    # web: workers of the host's forward process, one intra-op thread each; 0 = one per core
    forward_workers: int = 0
    model_refresh_s: float = 2.0
    # model versions the forward process keeps loaded (least recently used beyond)
    max_loaded_models: int = 4
    # the forward process's unix socket, shared by every web process on the host; empty =
    # home/forward/forward.sock (folder 0700); a set path's folder must be 0700 and Kiln's user's;
    # "private" = one forward process per web process
    forward_socket: str = ""
    # inputs of one model that may wait for a forward pass; beyond, /predict answers 503 + Retry-After at once
    predict_queue_max: int = 256
    # a forward process silent this long while a heartbeat waits is hung: killed and replaced
    forward_hang_s: float = 5.0
    # runtimes measured against eager when a version is registered (comma-separated: onnxruntime,
    # compile, bf16; empty = eager only); the fastest that agrees with eager serves
    serving_runtimes: str = "onnxruntime"

    # auth
    auth_enabled: bool = True
    protect_metrics: bool = False

    # ---------------------------------------------------------------- derived
    @property
    def home_path(self) -> Path:
        return Path(self.home).resolve()

    @property
    def redis_socket(self) -> Path:
        return self.home_path / "redis.sock"

    @property
    def broker_url(self) -> str:
        """The broker URL in the form Celery/kombu understands (unix sockets: redis+socket://)."""
        url = self.redis_url or f"unix://{self.redis_socket}"
        return "redis+socket://" + url[len("unix://"):] if url.startswith("unix://") else url

    @property
    def redis_client_url(self) -> str:
        """The broker URL in the form redis-py understands (unix sockets: unix://)."""
        url = self.redis_url or f"unix://{self.redis_socket}"
        return "unix://" + url[len("redis+socket://"):] if url.startswith("redis+socket://") else url

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_path / 'kiln.db'}"

    @property
    def storage(self) -> str:
        return self.storage_url or str(self.home_path / "storage")

    @property
    def data_root_paths(self) -> tuple[str, ...]:
        """The real paths of ``data_roots``, the folders a job config may name."""
        return split_roots(self.data_roots)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).resolve() if self.cache_dir else self.home_path / "cache"

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from KILN_* variables plus REDIS_URL, DATABASE_URL, STORAGE_URL."""
        env = os.environ if env is None else env
        plain = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL", "storage_url": "STORAGE_URL"}
        values = {}
        for f in dataclasses.fields(cls):
            key = plain.get(f.name, "KILN_" + f.name.upper())
            if key not in env:
                continue
            raw = env[key]
            kind = type(f.default)
            try:
                values[f.name] = _bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(f"environment variable {key}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    @classmethod
    def for_home(cls, home: str | Path, **overrides) -> "Settings":
        return cls(home=str(home), **overrides)

    def env(self) -> dict[str, str]:
        """These settings as environment variables (to hand to child processes)."""
        plain = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL", "storage_url": "STORAGE_URL"}
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[plain.get(f.name, "KILN_" + f.name.upper())] = (
                ("1" if value else "0") if isinstance(value, bool) else str(value))
        return out
