"""The Celery app factory: one Settings feeds the broker, the time limits and the retry policy.

Messages carry job ids only (JSON); the job row is the truth. Long GPU jobs are set up
as Celery's docs advise: prefetch 1, acks_late (training resumes from a checkpoint, and
the job lease makes a redelivered message harmless), reject on worker loss.

Priorities: kombu's Redis transport with one priority step per Kiln priority (worker.protocol)
and ``queue_order_strategy: priority``; with prefetch 1 a busy worker holds no waiting message,
so the next free slot takes the highest-priority job, first-come within a priority.
"""
from __future__ import annotations

from celery import Celery

from worker.protocol import PRIORITY_MAX, PRIORITY_STEPS, QUEUE


def make_celery(settings, *, name: str = "kiln") -> Celery:
    """A Celery app on ``settings.broker_url`` with Kiln's tasks registered."""
    app = Celery(name, broker=settings.broker_url, backend=settings.broker_url, set_as_current=False)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    broker_transport = {**transport, "priority_steps": PRIORITY_STEPS, "queue_order_strategy": "priority"}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=broker_transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # Keep long tasks running through a broker blip; the lease guards against a duplicate.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_soft_time_limit_s + 600,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_ignore_result=True,  # outcomes live in the job store
        task_default_queue=QUEUE,
        task_default_priority=PRIORITY_MAX,  # a message sent without one: Kiln priority 0 (the lowest)
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    app.conf.kiln_settings = settings
    from worker import tasks

    tasks.register(app)
    return app

