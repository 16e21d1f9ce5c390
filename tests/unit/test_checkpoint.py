"""Checkpoints: plain data (weights_only), loadable into hand-built models, written atomically."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import ml.checkpoint as ckpt_mod
from configs.schema import ModelConfig
from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.models import build_model
from ml.train import train
from tests.unit.conftest import tiny_config


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet")
    train(tiny_config("model.name=resnet18", "data.subset=64", "training.epochs=1"), out, console=False)
    return out


def test_loads_with_weights_only_into_a_hand_built_resnet18(resnet_run):
    state = torch.load(resnet_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "kiln.checkpoint/1"
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "batch_in_epoch", "rng", "config",
            "classes", "normalization", "image_size", "in_channels", "metrics", "best", "versions"} <= set(state)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)   # digits are grayscale
    model.load_state_dict(state["model"])                                             # strict
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_small_cnn_checkpoint_loads_into_build_model(tmp_path):
    train(tiny_config("training.epochs=1", "data.subset=64"), tmp_path, console=False)
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    model = build_model(ModelConfig(name="small_cnn"), len(state["classes"]), state["in_channels"])
    model.load_state_dict(state["model"])
    assert state["versions"]["torch"] == str(torch.__version__)


def test_interrupted_save_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 1})
    before = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.pt"]   # no temp files left
    assert load_checkpoint(path)["epoch"] == 1


def test_load_rejects_foreign_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_best_holds_weights_and_metadata_only(resnet_run):
    """best.pt is what is evaluated, registered and served: no optimizer, scheduler, scaler or RNG."""
    best = torch.load(resnet_run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(resnet_run / "checkpoints" / "last.pt", weights_only=True)
    assert not {"optimizer", "scheduler", "scaler", "rng", "partial"} & set(best)
    assert {"model", "config", "classes", "normalization", "metrics", "best", "versions"} <= set(best)
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])  # one epoch: same weights
    size = (resnet_run / "checkpoints" / "best.pt").stat().st_size
    assert size < 0.6 * (resnet_run / "checkpoints" / "last.pt").stat().st_size  # Adam's moments doubled it
