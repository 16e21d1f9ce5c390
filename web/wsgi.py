"""gunicorn's entry point: the app, built once per web process from the environment."""
from web import create_app

app = create_app()
