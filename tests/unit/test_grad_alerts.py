"""Gradient alerts (training.grad_alert): a layer whose gradient norm explodes or vanishes is named in
a warning and counted per epoch in metrics.jsonl; per-layer norms are those before clipping."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from configs import ConfigError, load_config
from configs.schema import ModelConfig
from ml.logs import GradAlerts
from ml.models import build_model
from ml.step import Accumulator, train_step
from ml.train import train
from tests.unit.conftest import read_metrics, tiny_config

LOG = logging.getLogger("kiln.ml.test_grad_alerts")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="mlp"), 10, 1)   # layers net.1, net.4, net.7


def scale_grads(module: nn.Module, factor: float) -> None:
    """Multiply the gradients of ``module``'s parameters by ``factor`` as backward produces them."""
    for p in module.parameters():
        p.register_hook(lambda g: g * factor)


def step(model, opt, seed: int, **kw):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    return train_step(model, x, y, nn.CrossEntropyLoss(), opt, torch.amp.GradScaler("cpu", enabled=False),
                      Accumulator(), n_micro=1, boundary=True, want_layer_norms=True, **kw)


def test_exploding_and_vanishing_layers_are_warned_about_once_per_epoch_and_counted(caplog):
    model = mlp()
    scale_grads(model.net[1], 1e6)      # explodes
    scale_grads(model.net[7], 1e-12)    # vanishes
    opt = torch.optim.SGD(model.parameters(), lr=0.0)   # lr 0: every step sees the same kind of gradients
    alerts = GradAlerts(max_norm=100.0, min_norm=1e-7)
    counts = []
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for s in range(1, 4):
            r = step(model, opt, s)
            assert r.layer_norms["net.1"] > 100.0 and r.layer_norms["net.7"] < 1e-7
            assert 1e-7 < r.layer_norms["net.4"] < 100.0
            counts.append(alerts.check(r.layer_norms, LOG, epoch=1, step=s))
        alerts.end_epoch(LOG, 1, sum(counts))
    assert counts == [2, 2, 2]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings       # the first of each layer in the epoch, then the summary
    assert warnings[0].startswith("gradient alert: epoch 1 step 1 layer net.1 grad norm ")
    assert "above max_norm 100 (exploding)" in warnings[0]
    assert warnings[1].startswith("gradient alert: epoch 1 step 1 layer net.7 grad norm ")
    assert "below min_norm 1e-07 (vanishing)" in warnings[1]
    assert warnings[2].startswith("epoch 1: 6 gradient alerts: net.1 over (3 steps, extreme ")
    assert "net.7 under (3 steps" in warnings[2] and "net.4" not in warnings[2]
    # the next epoch warns afresh
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert alerts.check(step(model, opt, 9).layer_norms, LOG, epoch=2, step=4) == 2
    assert [rec.getMessage()[:39] for rec in caplog.records] == ["gradient alert: epoch 2 step 4 layer ne"] * 2


def test_a_threshold_set_to_null_is_not_checked():
    norms = {"a": 1e9, "b": 0.0, "c": 1.0}
    assert GradAlerts(None, 1e-7).check(norms, LOG, 1, 1) == 1
    assert GradAlerts(100.0, None).check(norms, LOG, 1, 1) == 1
    assert GradAlerts(None, None).check(norms, LOG, 1, 1) == 0


def test_layer_norms_are_taken_before_clipping():
    model = mlp()
    scale_grads(model.net[1], 1e3)
    r = step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, grad_clip=1.0)
    assert r.grad_norm > 1.0
    total = sum(v * v for v in r.layer_norms.values()) ** 0.5
    assert total == pytest.approx(r.grad_norm, rel=1e-5)          # the unclipped global norm, split by layer
    assert set(r.layer_norms) == {"net.1", "net.4", "net.7"}


def test_training_counts_alerts_per_epoch_in_metrics_and_names_layers_in_the_log(tmp_path):
    # min_norm 0.5 sits above the BatchNorm layers' gradient norms (~0.05) of small_cnn on digits
    train(tiny_config("training.grad_alert.min_norm=0.5"), tmp_path, console=False)
    epochs = [r for r in read_metrics(tmp_path) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["grad_alerts"] > 0 for r in epochs)
    steps = [r for r in read_metrics(tmp_path) if r["type"] == "step"]
    log = (tmp_path / "train.log").read_text()
    assert "WARNING gradient alert: epoch 1 step 1 layer features.0.0.1 grad norm" in log
    assert "below min_norm 0.5 (vanishing)" in log
    assert f"WARNING epoch 2: {epochs[1]['grad_alerts']} gradient alerts: " in log
    # what the step rows record agrees: every logged step's layers under 0.5 were counted
    under = [sum(v < 0.5 for v in r["layer_grad_norms"].values()) for r in steps]
    assert all(u > 0 for u in under) and sum(under) <= sum(r["grad_alerts"] for r in epochs)


def test_defaults_raise_no_alert_on_a_healthy_run_and_null_turns_them_off(tmp_path):
    train(tiny_config(), tmp_path / "default", console=False)
    assert [r["grad_alerts"] for r in read_metrics(tmp_path / "default") if r["type"] == "epoch"] == [0, 0]
    assert "gradient alert" not in (tmp_path / "default" / "train.log").read_text()
    train(tiny_config("training.grad_alert=null", "training.epochs=1"), tmp_path / "off", console=False)
    assert all("grad_alerts" not in r for r in read_metrics(tmp_path / "off"))


@pytest.mark.parametrize("field,value", [("max_norm", 0.5), ("min_norm", 1.0), ("min_norm", -1.0),
                                         ("max_norm", "big")])
def test_thresholds_are_bounded_so_min_stays_under_max(field, value):
    with pytest.raises(ConfigError) as exc:
        load_config({"training": {"grad_alert": {field: value}}})
    assert [e.field for e in exc.value.errors] == [f"training.grad_alert.{field}"]
    assert load_config({}).training.grad_alert.max_norm == 100.0
    assert load_config({}).training.grad_alert.min_norm == 1e-7
