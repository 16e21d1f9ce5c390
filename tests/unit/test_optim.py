"""Optimizer/scheduler factories: decay groups, schedule shapes, state that survives weights_only."""
from __future__ import annotations

import pytest
import torch

from configs import load_config
from configs.schema import ModelConfig
from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.models import build_model
from ml.optim import build_optimizer, build_scheduler, lr_factor


def training(**kw):
    return load_config({"training": kw}).training


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_no_weight_decay_on_norms_and_biases(name, cls):
    model = build_model(ModelConfig(name="small_cnn"), 10, 1)
    opt = build_optimizer(model, training(optimizer=name, weight_decay=0.01))
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_schedule_shapes():
    cos = training(epochs=10, scheduler="cosine")
    assert lr_factor(0, cos, 10) == 1.0 and lr_factor(50, cos, 10) == pytest.approx(0.5)
    assert lr_factor(100, cos, 10) == pytest.approx(0.0, abs=1e-12)
    warm = training(epochs=10, scheduler="warmup", warmup_epochs=2)
    assert lr_factor(0, warm, 10) == pytest.approx(1 / 20) and lr_factor(19, warm, 10) == 1.0
    step = training(epochs=10, scheduler="step", step_size=3, gamma=0.5)
    assert lr_factor(29, step, 10) == 1.0 and lr_factor(30, step, 10) == 0.5 and lr_factor(60, step, 10) == 0.25


@pytest.mark.parametrize("scheduler", ["cosine", "warmup", "step", "onecycle"])
def test_scheduler_state_round_trips_through_a_checkpoint(tmp_path, scheduler):
    model = build_model(ModelConfig(name="mlp"), 10, 1)
    cfg = training(epochs=3, scheduler=scheduler, step_size=1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4)
    for _ in range(5):
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "scheduler": sched.state_dict(),
                                        "optimizer": opt.state_dict()})
    state = load_checkpoint(tmp_path / "c.pt")
    opt2 = build_optimizer(model, cfg)
    opt2.load_state_dict(state["optimizer"])
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=4)
    sched2.load_state_dict(state["scheduler"])
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
