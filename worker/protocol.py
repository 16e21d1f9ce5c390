"""The wire protocol between web hosts and workers: stable task names and how a job is sent.

Messages carry a job id only; the job row is the truth. New task arguments go last, with defaults.
"""
from __future__ import annotations

TASK_NAMES = {"train": "kiln.train", "predict": "kiln.predict"}


def send_job(app, job: dict, **options) -> None:
    """Enqueue a job by id (the task id is the job id, so the broker's queue can be inspected).

    ignore_result: no result-backend subscription, so a dead broker fails fast instead of retrying.
    """
    app.send_task(TASK_NAMES[job["kind"]], args=[job["id"]], task_id=job["id"], ignore_result=True, **options)
