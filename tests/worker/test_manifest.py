"""manifest.json: a train job run by the executor (inline) stores the resolved config, seed, dataset
hash, Kiln version and library versions beside its other artifacts; the dataset hash follows the data."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ml import environment
from ml.environment import dataset_hash
from worker import runner
from worker.runner import Context, execute
from worker.storage import Storage

ROOT = environment.ROOT


@pytest.fixture
def ctx(store, db_settings):
    s = dataclasses.replace(db_settings, heartbeat_s=0.2, lease_timeout_s=10.0, progress_every_s=0.2)
    return Context(s, store, Storage(s.storage), worker_name="test-host", launch="inline",
                   send_message=lambda job: None)


def write_images(folder, n: int = 12, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for k in range(n):
        label = str(k % 2)
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(folder / label / f"{k}.png")


def test_a_train_job_stores_its_manifest_with_its_artifacts(ctx, tmp_path):
    ds = "c" * 32
    write_images(tmp_path / "upload")
    shutil.copytree(tmp_path / "upload", ctx.storage.local_path(f"datasets/{ds}"))
    config = {"data": {"dataset": ds, "image_size": 8, "num_workers": 0},
              "training": {"epochs": 1, "batch_size": 4, "device": "cpu", "seed": 7}}
    job = ctx.store.create("train", config, max_attempts=1)
    torch.set_num_threads(1)
    assert execute(job["id"], ctx, {"train": runner.run_train}) == "succeeded"

    listed = {a["name"]: a for a in ctx.storage.list(f"jobs/{job['id']}")}
    assert "manifest.json" in listed and len(listed["manifest.json"]["sha256"]) == 64
    m = json.loads(ctx.storage.read_bytes(f"jobs/{job['id']}/manifest.json"))
    assert m["format"] == "kiln.manifest/1" and m["seed"] == 7 and m["deterministic"] is False
    assert m["config"]["data"]["dataset"] == ds and m["config"]["training"]["seed"] == 7
    assert m["config"]["model"]["num_classes"] == 2 and m["config"]["model"]["in_channels"] == 3   # resolved
    d = m["dataset"]
    assert d["name"] == ds and d["method"] == "files" and d["files"] == 12 and d["classes"] == ["0", "1"]
    assert d["train"] + d["val"] == 12 and len(d["sha256"]) == 64
    env = m["environment"]
    assert env["torch"] == torch.__version__ and env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["cuda"] == torch.version.cuda and env["device"] == "cpu" and env["world_size"] == 1
    assert env["kiln"] == environment.kiln_version() and env["torchvision"]
    assert m["resumes"] == []
    log = ctx.storage.read_bytes(f"jobs/{job['id']}/train.log").decode()
    assert f"manifest: dataset {ds} sha256 {d['sha256'][:16]} (files)" in log


def test_the_dataset_hash_is_a_function_of_the_files_and_the_split(tmp_path):
    from configs import load_config
    from ml.data import build_data

    for name in ("a", "b", "c"):
        write_images(tmp_path / name)
    pixel = tmp_path / "c" / "1" / "3.png"
    Image.open(pixel).point(lambda v: 255 - v).save(pixel)  # one image of c differs from a's

    def digest(name: str, seed: int = 0) -> dict:
        cfg = load_config({"data": {"dataset": "imagefolder", "root": str(tmp_path / name), "image_size": 8}})
        return dataset_hash(cfg, build_data(cfg.data, seed=seed), str(tmp_path / name))

    a, b, c = digest("a"), digest("b"), digest("c")
    assert a == b                                     # the same content in another folder
    assert a["sha256"] != c["sha256"]                 # one changed image
    assert a["sha256"] != digest("a", seed=1)["sha256"]   # another split of the same files
    # digits is hashed from its tensors: the subset, image size and normalisation are in it
    cfg = load_config({"data": {"subset": 100, "image_size": 8}})
    t1 = dataset_hash(cfg, build_data(cfg.data, seed=0), None)
    assert t1["method"] == "tensors" and t1 == dataset_hash(cfg, build_data(cfg.data, seed=0), None)
    cfg2 = load_config({"data": {"subset": 100, "image_size": 16}})
    assert dataset_hash(cfg2, build_data(cfg2.data, seed=0), None)["sha256"] != t1["sha256"]


def test_kiln_version_is_the_env_var_else_the_git_commit(monkeypatch):
    environment.kiln_version.cache_clear()
    monkeypatch.setenv("KILN_VERSION", "1.2.3")
    assert environment.kiln_version() == "1.2.3"
    environment.kiln_version.cache_clear()
    monkeypatch.delenv("KILN_VERSION")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        expected = out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        expected = "unknown"
    assert environment.kiln_version() == expected
    if expected != "unknown":
        assert len(expected) == 40 and int(expected, 16) >= 0
    environment.kiln_version.cache_clear()


def test_a_resumed_run_appends_its_environment_and_keeps_the_first(tmp_path):
    from ml.train import train
    from tests.unit.conftest import tiny_config

    torch.set_num_threads(1)
    cfg = tiny_config("training.epochs=2")
    polls = iter(range(1000))
    train(cfg, tmp_path, should_stop=lambda: next(polls) >= 8, console=False)   # stops mid epoch 2
    first = json.loads((tmp_path / "manifest.json").read_text())
    train(cfg, tmp_path, console=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert {k: v for k, v in m.items() if k != "resumes"} == {k: v for k, v in first.items() if k != "resumes"}
    assert len(m["resumes"]) == 1 and m["resumes"][0]["epoch"] == 1 and m["resumes"][0]["step"] == 9
    assert m["resumes"][0]["dataset_sha256"] == m["dataset"]["sha256"]
