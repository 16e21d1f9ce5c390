"""The wire protocol between web hosts and workers: stable task names and how a job is sent.

Messages carry a job id only; the job row is the truth. New task arguments go last, with defaults.

Priority: a job's ``priority`` (PRIORITY_MIN..PRIORITY_MAX, higher runs first) rides on the
message as kombu's priority. kombu's Redis transport keeps one list per priority step
(``kiln``, ``kiln\\x06\\x161`` ... ``kiln\\x06\\x169``) and BRPOPs them in step order, so its
step 0 is the *highest*: Kiln priority p is sent as kombu priority ``PRIORITY_MAX - p``.
"""
from __future__ import annotations

TASK_NAMES = {"train": "kiln.train", "predict": "kiln.predict"}
PRIORITY_MIN, PRIORITY_MAX = 0, 9
PRIORITY_STEPS = list(range(PRIORITY_MIN, PRIORITY_MAX + 1))  # one broker list per Kiln priority
QUEUE = "kiln"
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: <queue><sep><step> for steps above 0


def broker_priority(priority) -> int:
    """Kiln priority (higher first) -> kombu's Redis priority (0 first); out-of-range values are clamped."""
    try:
        p = int(priority or 0)
    except (TypeError, ValueError):
        p = 0
    return PRIORITY_MAX - min(max(p, PRIORITY_MIN), PRIORITY_MAX)


def queue_lists(queue: str = QUEUE) -> list[str]:
    """The Redis lists kombu keeps ``queue``'s messages in, highest priority first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def send_job(app, job: dict, **options) -> None:
    """Enqueue a job by id (the task id is the job id, so the broker's queue can be inspected).

    ignore_result: no result-backend subscription, so a dead broker fails fast instead of retrying.
    The message's priority comes from the job's ``priority`` unless ``options`` names one.
    """
    options.setdefault("priority", broker_priority(job.get("priority")))
    app.send_task(TASK_NAMES[job["kind"]], args=[job["id"]], task_id=job["id"], ignore_result=True, **options)
