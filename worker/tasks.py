"""Thin tasks with stable names, and the pool process's Context; the logic lives in worker.runner.

The task signature is a wire protocol (worker.protocol): a job id, new arguments last with defaults.
"""
from __future__ import annotations

import functools
import logging
import socket

from worker.protocol import TASK_NAMES, send_job
from worker.runner import Context, Transient, execute
from worker.store import JobStore

log = logging.getLogger("kiln.worker")
_contexts: dict[int, Context] = {}


def context(app) -> Context:
    """This process's Context for ``app``, built on first use (after fork)."""
    ctx = _contexts.get(id(app))
    if ctx is None:
        from worker.storage import Storage

        s = app.conf.kiln_settings
        ctx = Context(s, JobStore.from_settings(s), Storage(s.storage), functools.partial(send_job, app),
                      s.worker_name or socket.gethostname())
        _contexts[id(app)] = ctx
    return ctx


def reset_context() -> None:
    """Forget contexts inherited through a fork (their pools belong to the parent)."""
    _contexts.clear()


def register(app) -> None:
    """Register kiln.train and kiln.predict on ``app``."""

    def _run(task, job_id: str) -> str:
        try:
            return execute(job_id, context(task.app))
        except Transient as exc:
            # the job row went back to queued; a fresh message (after a pause) runs it again
            raise task.retry(exc=exc, countdown=exc.retry_in, max_retries=None)

    # shared=False: the tasks belong to this app only (another app in the process gets its own)
    job_task = {"bind": True, "acks_late": True, "Request": "worker.requests:JobRequest", "shared": False}

    @app.task(name=TASK_NAMES["train"], **job_task)
    def train(self, job_id: str) -> str:
        return _run(self, job_id)

    @app.task(name=TASK_NAMES["predict"], **job_task)
    def predict(self, job_id: str) -> str:
        return _run(self, job_id)
