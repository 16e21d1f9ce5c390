"""Serving fixtures: one small model trained per session, a registry, the Flask app."""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """best.pt of small_cnn trained for seconds on a digits subset (image_size 16, 2 epochs)."""
    import torch

    from configs import load_config
    from ml.train import train

    torch.set_num_threads(1)  # the machine is shared: keep test processes to one core
    out = tmp_path_factory.mktemp("run")
    train(load_config(ROOT / "configs/smoke.yaml"), out, console=False)
    return out / "checkpoints" / "best.pt"


@pytest.fixture(scope="session")
def trained_last(trained) -> Path:
    return trained.with_name("last.pt")


@pytest.fixture(scope="session")
def forward_socket():
    """One forward process for every test app of the session (each new one imports torch anew)."""
    from web.serving.web_client import ForwardClient

    folder = tempfile.mkdtemp(prefix="kfwd", dir="/tmp")  # unix socket paths must stay short
    path = os.path.join(folder, "forward.sock")
    keeper = ForwardClient(workers=1, max_batch_size=8, max_delay_ms=2.0, address=path)
    keeper.ping()  # starts it; this connection keeps it alive between tests
    yield path
    keeper.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def serve_settings(settings, forward_socket):
    """Test settings with small limits so the 4xx paths are cheap to reach."""
    return dataclasses.replace(settings, max_request_bytes=512 * 1024, max_image_pixels=512 * 512,
                               max_predict_images=8, max_batch_size=8, max_delay_ms=2.0,
                               model_refresh_s=0.2, forward_workers=1, forward_socket=forward_socket)


@pytest.fixture
def registry(serve_settings):
    from worker.db import migrate
    from worker.registry import Registry

    migrate(serve_settings)
    return Registry.from_settings(serve_settings)


@pytest.fixture
def registered(registry, trained, trained_last):
    """digits versions 1 (best) and 2 (last); production -> 1."""
    registry.register_checkpoint("digits", trained, checkpoint="best")
    registry.register_checkpoint("digits", trained_last, checkpoint="last")
    registry.set_alias("digits", "production", 1)
    return registry


@pytest.fixture
def succeeded_job(serve_settings, trained, registry) -> str:
    """The id of a succeeded training job whose best checkpoint is ``trained`` (what POST /v1/models takes)."""
    from worker.storage import Storage
    from worker.store import JobStore

    store = JobStore.from_settings(serve_settings)
    job_id = store.create("train", {"model": {"name": "small_cnn"}})["id"]
    assert store.acquire_lease(job_id, "test", 30) and store.start(job_id, "test", "test-host")
    assert store.finish(job_id, "test", "succeeded", "trained by the serving fixtures")
    Storage(serve_settings.storage).put_file(trained, f"jobs/{job_id}/checkpoints/best.pt")
    return job_id


@pytest.fixture
def app(serve_settings, registered):
    from web import create_app

    app = create_app(serve_settings)
    app.config["TESTING"] = True
    yield app
    server = app.extensions.get("kiln.serving")
    if server is not None:
        server.close()


@pytest.fixture
def client(app):
    return app.test_client()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def digit_pngs() -> list[tuple[bytes, int]]:
    """A few real digits (scikit-learn's bundled set) rendered to PNG, with their labels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(png(Image.fromarray(np.rint(d.images[i] * 255 / 16).astype(np.uint8), "L")), int(d.target[i]))
            for i in range(10)]

