"""Kiln: the facade web/ uses. It never imports torch; it connects lazily.

Submitting writes the row first, then sends the job id to the broker; if the broker
is down the job simply stays queued and the worker's reconciler sends it later.
"""
from __future__ import annotations

import contextlib
import json
import logging

import sqlalchemy as sa

from configs import dump_yaml, parse_config, to_dict as config_dict
from configs.names import TERMINAL_STATES, is_id, parse_model_ref
from configs.paths import check_paths
from worker import db, sweeps, workers
from worker.errors import InvalidInput, NotFound
from worker.storage import Storage, clean_path
from worker.store import JobStore, to_dict

log = logging.getLogger("kiln.service")
SERIES_SKIP = {"type", "epoch", "step"}


class Kiln:
    """Jobs, logs, metrics, artifacts, datasets and models for the web layer."""

    def __init__(self, settings):
        self.settings = settings
        self._store: JobStore | None = None
        self._storage: Storage | None = None
        self._celery = None
        self._registry = None

    # ----------------------------------------------------------- lazy parts
    @property
    def engine(self) -> sa.Engine:
        return db.make_engine(self.settings)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.engine)
        return self._store

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.settings.storage)
        return self._storage

    @property
    def celery(self):
        if self._celery is None:
            from worker.app import make_celery

            self._celery = make_celery(self.settings)
            # a request must not hang on a dead broker: fail fast, the reconciler sends the job later
            self._celery.conf.update(broker_connection_max_retries=1, broker_connection_timeout=2)
        return self._celery

    # ----------------------------------------------------------------- jobs
    def submit_job(self, kind: str, config: dict, priority: int = 0) -> dict:
        """Validate, store (queued) and enqueue a job; ConfigError/InvalidInput for bad input."""
        if kind == "sweep":  # stored running, with its trials queued as child training jobs
            return self.get_job(sweeps.submit_sweep(self, config, priority))
        cfg = parse_config(config, kind)
        plain = config_dict(cfg)
        check_paths(kind, plain, self.settings.data_root_paths)
        self._check_dataset(cfg)
        if kind == "predict":
            self._check_model(cfg.model)
        waits_for = workers.check_fits(self.engine, kind, plain, self.settings)  # 422 if no live worker can hold it
        job = self.store.create(kind, plain, max_attempts=self.settings.max_attempts, priority=priority)
        if waits_for:
            workers.set_pending_reason(self.engine, job["id"], waits_for, in_hand=False)
        self.storage.write_recorded(f"jobs/{job['id']}", "config.yaml", dump_yaml(cfg).encode())
        accepted = self.store.job_dict(self.store.get(job["id"]))  # queued, with its place in the queue
        self._send(job)  # from here a warm worker may start it before this answer leaves
        return accepted

    def _check_dataset(self, cfg) -> None:
        ds = cfg.data.dataset
        if not is_id(ds):
            return
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(db.datasets.c.id).where(db.datasets.c.id == ds)).first()
        if found is None:
            raise InvalidInput(f"dataset {ds} does not exist; upload one with POST /v1/datasets",
                               [{"field": "data.dataset", "message": f"no uploaded dataset with id {ds}"}])

    def _check_model(self, ref: str) -> None:
        """InvalidInput naming ``model`` unless the registry has that model, version or alias."""
        name, version, alias = parse_model_ref(ref)
        try:
            model = self.registry.get_model(name)
        except NotFound:
            model = None
        if model is None:
            problem = f"no model named {name!r}; register one with POST /v1/models"
        elif version is not None and version not in {v["version"] for v in model["versions"]}:
            problem = f"model {name!r} has no version {version}"
        elif alias is not None and alias not in model["aliases"]:
            problem = f"model {name!r} has no alias {alias!r}"
        else:
            return
        raise InvalidInput(f"model {ref!r} does not exist: {problem}", [{"field": "model", "message": problem}])

    def _send(self, job: dict) -> None:
        from worker.protocol import send_job

        try:
            send_job(self.celery, job, retry=True, retry_policy={"max_retries": 1, "interval_start": 0,
                                                                 "interval_step": 0.2, "interval_max": 0.5})
            self.store.mark_enqueued(job["id"])
        except Exception as exc:  # the row is queued: the reconciler sends it once the broker is back
            log.warning("job %s stored but not sent (%s); the reconciler will send it", job["id"], exc)

    def get_job(self, job_id: str) -> dict:
        return sweeps.with_sweep(self.store, self.store.job_dict(self.store.get(self._job_id(job_id))))

    def job_events(self, job_id: str) -> list[dict]:
        self.store.get(self._job_id(job_id))
        return self.store.events(job_id)

    def list_jobs(self, status=None, kind=None, limit: int = 50, offset: int = 0, parent=None) -> dict:
        rows, total = self.store.list(status=status, kind=kind, limit=limit, offset=offset, parent=parent)
        return {"jobs": self.store.job_dicts(rows), "total": total, "limit": limit, "offset": offset}

    def cancel_job(self, job_id: str) -> dict:
        """Queued: cancelled at once. Running: cancelling, then cancelled at a step boundary. A sweep:
        cancelled at once, with its unfinished trials."""
        if self.store.get(self._job_id(job_id))["kind"] == "sweep":
            sweeps.cancel_sweep(self.store, job_id)
            return self.get_job(job_id)
        return to_dict(self.store.request_cancel(self._job_id(job_id)))

    def retry_job(self, job_id: str) -> dict:
        """A failed or cancelled job queued again in place; it resumes from checkpoints/last.pt if any."""
        job_id = self._job_id(job_id)
        sweeps.refuse_retry(self.store.get(job_id))  # a sweep runs on no worker: submit it again
        resumes = self.storage.exists(f"jobs/{job_id}/checkpoints/last.pt")
        why = "retried by user; " + ("resumes from checkpoints/last.pt" if resumes else "no checkpoint: starts over")
        job = self.store.retry(job_id, extra_attempts=self.settings.max_attempts, reason=why)
        self._send(job)
        return self.store.job_dict(self.store.get(job_id))

    def _job_id(self, job_id: str) -> str:
        if not is_id(job_id):
            raise NotFound(f"job {job_id!r} not found; job ids are 32 hex digits")
        return job_id

    # -------------------------------------------------------- job outputs
    def read_log(self, job_id: str, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int, bool]:
        """train.log from byte ``offset``: (data, next offset, job finished)."""
        finished = self.get_job(job_id)["status"] in TERMINAL_STATES
        path = f"jobs/{job_id}/train.log"
        if not self.storage.exists(path):
            return b"", offset, finished
        data = self.storage.read_bytes(path, max(0, offset), limit)
        at_eof = len(data) < limit
        if not finished and b"\n" in data:
            data = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        return data, offset + len(data), finished and at_eof

    def job_metrics(self, job_id: str) -> dict:
        """Per-epoch rows of metrics.jsonl and a series per metric."""
        self.get_job(job_id)
        path = f"jobs/{job_id}/metrics.jsonl"
        epochs = []
        if self.storage.exists(path):
            for line in self.storage.read_bytes(path).decode("utf-8", "replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if isinstance(row, dict) and row.get("type", "epoch") == "epoch" and "epoch" in row:
                    epochs.append(row)
        by_epoch = {r["epoch"]: r for r in epochs}  # a resumed run may repeat an epoch: keep the last
        epochs = [by_epoch[e] for e in sorted(by_epoch)]
        names = sorted({k for r in epochs for k, v in r.items()
                        if k not in SERIES_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)})
        series = {"epoch": [r["epoch"] for r in epochs]}
        series.update({n: [r.get(n) for r in epochs] for n in names})
        return {"epochs": epochs, "series": series}

    def list_artifacts(self, job_id: str) -> list[dict]:
        self.get_job(job_id)
        return self.storage.list(f"jobs/{job_id}")

    def open_artifact(self, job_id: str, path: str):
        """(binary file object, size) of jobs/<id>/<path>; InvalidInput on traversal, NotFound if absent."""
        self.get_job(job_id)
        rel = clean_path(path)
        full = f"jobs/{job_id}/{rel}"
        if not rel or not self.storage.exists(full) or self.storage.isdir(full):
            raise NotFound(f"job {job_id} has no artifact {path!r}; list them at /v1/jobs/{job_id}/artifacts")
        return self.storage.open(full, "rb"), self.storage.size(full)

    # ------------------------------------------------------------- datasets
    def create_dataset(self, fileobj, filename: str, name: str | None = None) -> dict:
        from worker import datasets

        return datasets.create_dataset(self, fileobj, filename, name=name)

    def list_datasets(self) -> list[dict]:
        from worker import datasets

        return datasets.list_datasets(self)

    def get_dataset(self, dataset_id: str) -> dict:
        from worker import datasets

        return datasets.get_dataset(self, dataset_id)

    # --------------------------------------------------------------- models
    @property
    def registry(self):
        if self._registry is None:
            from worker.registry import Registry

            self._registry = Registry.from_settings(self.settings, engine=self.engine, storage=self.storage)
        return self._registry

    def register_model(self, name: str, job_id: str, checkpoint: str = "best") -> dict:
        return self.registry.register_model(name, job_id, checkpoint)

    def list_models(self) -> dict:
        return self.registry.list_models()

    def get_model(self, name: str) -> dict:
        return self.registry.get_model(name)

    def set_alias(self, name: str, alias: str, version: int) -> dict:
        return self.registry.set_alias(name, alias, version)

    def resolve_model(self, ref: str) -> dict:
        return self.registry.resolve_model(ref)

    # -------------------------------------------------------------- metrics
    def job_counts(self) -> dict[str, int]:
        """Jobs per state, every state included."""
        return self.store.counts()

    def queue_depth(self) -> int | None:
        """Jobs whose message waits in the broker's queue; None when the broker cannot be read."""
        from worker.reconcile import queued_in_broker

        with self._redis() as client:
            waiting = queued_in_broker(client)
        return None if waiting is None else len(waiting)

    def worker_heartbeats(self) -> dict:
        """Each worker's newest job heartbeat (aware UTC datetimes)."""
        return self.store.worker_heartbeats()

    # --------------------------------------------------------------- health
    def health(self) -> dict:
        """Store, broker (PING) and storage checks: {name: {"ok": bool, "error"?: str}}."""
        return {"store": _check(self._check_store), "broker": _check(self._check_broker),
                "storage": _check(self._check_storage)}

    def _check_store(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def _check_broker(self) -> None:
        with self._redis() as client:
            client.ping()

    @contextlib.contextmanager
    def _redis(self):
        """A short-lived redis-py client on the broker that gives up after 2 s."""
        import redis

        client = redis.Redis.from_url(self.settings.redis_client_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            yield client
        finally:
            client.close()

    def _check_storage(self) -> None:
        self.storage.fs.ls(self.storage.root)

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()
            self._celery = None


def _check(fn) -> dict:
    try:
        fn()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
