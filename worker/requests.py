"""A Celery Request that drops, in the worker's main process, messages for jobs that cannot run.

With one fresh child per job (max_tasks_per_child=1), a redelivered or duplicate message
for a finished or live-leased job would otherwise cost a whole child fork just to be
dropped. The child still re-checks under the lease; this is only a cheap pre-filter.
"""
from __future__ import annotations

import logging

from celery.worker.request import Request

log = logging.getLogger("kiln.worker")


def _droppable(app, job_id: str) -> str | None:
    from configs.names import ACTIVE_STATES, TERMINAL_STATES
    from worker.clock import as_utc, utcnow
    from worker.errors import NotFound
    from worker.tasks import context

    try:
        row = context(app).store.get(job_id)
    except NotFound:
        return "unknown job"
    except Exception:  # store blip: let the child decide
        return None
    if row["status"] in TERMINAL_STATES:
        return f"job already {row['status']}"
    expires = as_utc(row["lease_expires"])
    if row["status"] in ACTIVE_STATES and expires is not None and expires > utcnow():
        return "job leased by a live worker"
    return None


class JobRequest(Request):
    """Celery's pool dispatch asks ``revoked()`` first: a message we can drop is "revoked" there, acked
    in the main process, and never costs a child."""

    def revoked(self):
        if super().revoked():
            return True
        job_id = self.args[0] if self.args else None
        reason = _droppable(self.task.app, job_id) if isinstance(job_id, str) else None
        if reason is None:
            return False
        log.info("dropping message for job %s in the main process: %s", job_id, reason)
        self._announce_revoked(reason, terminated=False, signum=None, expired=False)
        return True
