"""The thin tasks: stable names on the wire, and a Transient outcome turned into Celery's retry."""
from __future__ import annotations

import pytest
from celery.exceptions import Retry

from worker import tasks
from worker.app import make_celery
from worker.protocol import TASK_NAMES
from worker.runner import Transient


@pytest.fixture
def app(settings):
    make_celery(settings).tasks  # another app in the same process first: each keeps its own tasks
    return make_celery(settings)


def test_task_names_are_the_wire_protocol(app):
    assert {TASK_NAMES["train"], TASK_NAMES["predict"]} <= set(app.tasks)
    assert TASK_NAMES == {"train": "kiln.train", "predict": "kiln.predict"}


@pytest.mark.parametrize("kind", ["train", "predict"])
def test_a_transient_error_becomes_a_retry_after_its_pause(app, kind, monkeypatch):
    task = app.tasks[TASK_NAMES[kind]]
    monkeypatch.setattr(tasks, "context", lambda app: "ctx")

    def execute(job_id, ctx):
        assert (job_id, ctx) == ("a" * 32, "ctx")
        raise Transient("broker went away", retry_in=7.5)

    monkeypatch.setattr(tasks, "execute", execute)
    asked = {}

    def retry(self, exc=None, countdown=None, max_retries=None, **_):
        asked.update(exc=exc, countdown=countdown, max_retries=max_retries)
        return Retry("retry", exc, when=countdown)

    monkeypatch.setattr(type(task), "retry", retry)
    with pytest.raises(Retry):
        task.run("a" * 32)
    assert isinstance(asked["exc"], Transient) and asked["countdown"] == 7.5 and asked["max_retries"] is None


def test_an_outcome_passes_through(app, monkeypatch):
    monkeypatch.setattr(tasks, "context", lambda app: "ctx")
    monkeypatch.setattr(tasks, "execute", lambda job_id, ctx: "succeeded")
    assert app.tasks[TASK_NAMES["train"]].run("b" * 32) == "succeeded"
