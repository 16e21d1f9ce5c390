"""Config validation as the ML layer relies on it; every shipped YAML loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs import ConfigError, load_config, load_predict_config
from tests.unit.conftest import ROOT

# Update when a config is added or removed: guards against a non-recursive listing finding too few.
EXPECTED_YAML_FILES = 4


def test_every_config_error_is_reported_at_once():
    bad = {"model": {"name": "resnet9000", "colour": "red"},
           "data": {"val_split": 1.5},
           "training": {"lr": -0.1, "batch_size": 0, "optimizer": "rmsprop", "epochs": "ten"}}
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    fields = {e.field: e.message for e in info.value.errors}
    assert set(fields) == {"model.name", "model.colour", "data.val_split", "training.lr",
                           "training.batch_size", "training.optimizer", "training.epochs"}
    assert "unknown value 'resnet9000'" in fields["model.name"]
    assert "unknown key" in fields["model.colour"]
    assert "< 1.0" in fields["data.val_split"]
    assert "> 0.0" in fields["training.lr"]
    assert ">= 1" in fields["training.batch_size"]
    assert "rmsprop" in fields["training.optimizer"] and "adamw" in fields["training.optimizer"]
    assert "integer" in fields["training.epochs"]


def test_override_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/smoke.yaml", ["training.batch_size=0", "training.lr=-1"])
    assert {e.field for e in info.value.errors} == {"training.batch_size", "training.lr"}


def test_every_yaml_in_configs_loads():
    files = sorted(Path(ROOT / "configs").rglob("*.yaml"))
    assert len(files) == EXPECTED_YAML_FILES, [f.name for f in files]
    for path in files:
        data = yaml.safe_load(path.read_text())
        # predict configs name a model reference (a string); training configs a model section.
        if isinstance(data.get("model"), str):
            assert load_predict_config(path).model
        else:
            assert load_config(path).training.epochs >= 1
