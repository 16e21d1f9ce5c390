"""Kiln's job side: the Celery app and tasks, job processes, the job store, artifact storage, the
registry and the functions web/ calls (worker.service). Imports ml/ and configs/, never web/."""
