"""Fault tests share the live Kiln of the integration tests (real Redis, Celery worker, gunicorn)."""
from tests.integration.conftest import live_service, live_settings  # noqa: F401  (same live fixture)
