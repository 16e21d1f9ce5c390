from tests.integration.conftest import live_service, live_settings  # noqa: F401  (same live fixture)
