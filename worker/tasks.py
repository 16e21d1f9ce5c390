"""Thin tasks with stable names; the logic lives in worker.runner and worker.reconcile.

The task signature is a wire protocol: a job id, new arguments last with defaults.
"""
from __future__ import annotations

import logging

log = logging.getLogger("kiln.worker")


def register(app) -> None:
    """Register kiln.train, kiln.predict and kiln.reconcile on ``app``."""
    from worker.app import RECONCILE, TASK_NAMES

    def _run(task, job_id: str) -> str:
        from worker import runner
        from worker.runner import Transient

        try:
            return runner.execute(job_id, runner.context(task.app))
        except Transient as exc:
            # the job row went back to queued; a fresh message (after a pause) runs it again
            raise task.retry(exc=exc, countdown=exc.retry_in, max_retries=None)

    job_task = {"bind": True, "acks_late": True, "Request": "worker.requests:JobRequest"}

    @app.task(name=TASK_NAMES["train"], **job_task)
    def train(self, job_id: str) -> str:
        return _run(self, job_id)

    @app.task(name=TASK_NAMES["predict"], **job_task)
    def predict(self, job_id: str) -> str:
        return _run(self, job_id)

    @app.task(name=RECONCILE, bind=True, acks_late=False)
    def reconcile(self, job_id: str | None = None) -> dict:
        from worker import runner
        from worker.reconcile import reconcile as run_pass

        ctx = runner.context(self.app)
        return run_pass(ctx.store, lambda job: ctx.send(job), ctx.settings, broker=ctx.broker_client())
