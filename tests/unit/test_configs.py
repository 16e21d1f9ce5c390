"""Config validation as the ML layer relies on it; every shipped YAML loads; hostile values are field errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from configs import (
    ConfigError, ModelConfig, PredictConfig, TrainConfig, apply_overrides, dump_yaml, json_schema, load_config,
    load_predict_config, parse_config, to_dict,
)
from configs.errors import short
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
    assert "unknown model 'resnet9000'" in fields["model.name"]
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


def value_id(value):
    """Test ids that never print a huge integer (str() refuses beyond 4300 digits)."""
    return short(value) if isinstance(value, int) and not isinstance(value, bool) else None


def errors_of(data, kind: str = "train") -> dict[str, str]:
    """{field: message} of the ConfigError ``data`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, kind)
    return {e.field: e.message for e in info.value.errors}


def section(field: str, value) -> dict:
    """{"training": {"lr": value}} from ("training.lr", value)."""
    name, key = field.split(".")
    return {name: {key: value}}


FLOAT_FIELDS = ["model.dropout", "data.val_split", "training.lr", "training.momentum", "training.weight_decay",
                "training.gamma", "training.label_smoothing", "training.grad_clip"]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [10**400, -(10**400), float("nan"), float("inf"), float("-inf"), 10**5000],
                         ids=value_id)
def test_huge_and_non_finite_numbers_are_field_errors(field, value):
    errors = errors_of(section(field, value))
    assert list(errors) == [field]
    assert len(errors[field]) < 200  # never the 400 digits themselves


@pytest.mark.parametrize("field, value", [
    ("model.num_classes", 10**9), ("model.num_classes", 100_001), ("data.subset", 10**12),
    ("training.warmup_epochs", 10**6), ("training.step_size", 10**6), ("training.early_stopping_patience", 10**6),
    ("training.checkpoint_every", 10**6), ("training.log_every_steps", 10**7), ("training.grad_clip", 1e7),
    ("training.epochs", 10**400), ("training.seed", 2**32), ("training.processes", 65), ("training.processes", 0),
    ("data.num_workers", 65), ("data.image_size", 10**5000),
], ids=value_id)
def test_integers_that_had_no_upper_bound_are_refused(field, value):
    errors = errors_of(section(field, value))
    assert list(errors) == [field] and "must be" in errors[field]


@pytest.mark.parametrize("field, value", [("model.num_classes", 100_000), ("training.grad_clip", 1e6),
                                          ("training.processes", 64), ("training.processes", "auto"),
                                          ("training.log_every_steps", 1_000_000)])
def test_the_largest_documented_values_are_accepted(field, value):
    cfg = parse_config(section(field, value))
    name, key = field.split(".")
    assert getattr(getattr(cfg, name), key) == value


def test_every_numeric_field_documents_a_range():
    """Each number in both published schemas has a minimum and a maximum (exclusive or not)."""
    def numbers(schema, path=""):
        for variant in schema.get("anyOf", [schema]):
            if variant.get("type") in ("integer", "number"):
                yield path, variant
        for name, sub in schema.get("properties", {}).items():
            yield from numbers(sub, f"{path}.{name}".lstrip("."))

    for cls in (TrainConfig, PredictConfig):
        found = list(numbers(json_schema(cls)))
        assert len(found) >= (22 if cls is TrainConfig else 3)
        for path, s in found:
            assert {"minimum", "exclusiveMinimum"} & set(s), path
            assert {"maximum", "exclusiveMaximum"} & set(s), path


@pytest.mark.parametrize("device, ok", [("cuda:99999", False), ("cuda:64", False), ("cuda:007", False),
                                        ("cuda:-1", False), ("cuda:63", True), ("cuda:0", True), ("cuda", True),
                                        ("cpu\n", False), ("CPU", False), ("mps", True)])
def test_device_index_is_bounded(device, ok):
    data = {"training": {"device": device}}
    if ok:
        assert parse_config(data).training.device == device
        assert parse_config({"model": "digits", "data": {"dataset": "digits"}, "device": device}, "predict")
    else:
        assert list(errors_of(data)) == ["training.device"]


@pytest.mark.parametrize("value", ["0" * 32 + "\n", "digits\n", "\n" + "0" * 32, "0" * 31 + "\n", "0" * 33,
                                   "0" * 31 + "G", " digits", "digits "])
def test_dataset_names_match_in_full(value):
    assert list(errors_of({"data": {"dataset": value}})) == ["data.dataset"]
    assert "data.dataset" in errors_of({"model": "digits", "data": {"dataset": value}}, "predict")


@pytest.mark.parametrize("ref", ["digits\n", "digits@production\n", "digits:3\n", "digits:1234567890",
                                 "a" * 65, "", "digits@", "-digits"])
def test_model_references_match_in_full(ref):
    assert list(errors_of({"model": ref, "data": {"dataset": "digits"}}, "predict")) == ["model"]


def test_processes_defaults_to_one_and_takes_auto():
    assert parse_config({}).training.processes == 1
    assert parse_config({"training": {"processes": "auto"}}).training.processes == "auto"
    for bad in (True, 2.0, "all", "2", None):
        assert list(errors_of({"training": {"processes": bad}})) == ["training.processes"]


@pytest.mark.parametrize("data, field, words", [
    ({"training": {"epochs": 3.0}}, "training.epochs", "integer"),        # strict: no floats for ints
    ({"training": {"epochs": True}}, "training.epochs", "integer"),
    ({"training": {"lr": True}}, "training.lr", "number"),
    ({"training": {"debug": 1}}, "training.debug", "true or false"),
    ({"training": {"lr": "1e-3"}}, "training.lr", "number"),
    ({"model": {"num_classes": "ten"}}, "model.num_classes", "an integer or 'auto'"),
    ({"model": {"num_classes": 1}}, "model.num_classes", ">= 2"),
    ({"model": {"in_channels": 2}}, "model.in_channels", "1, 3"),
    ({"model": {"in_channels": True}}, "model.in_channels", "integer"),
    ({"model": {"name": b"mlp"}}, "model.name", "string"),
    ({"model": None}, "model", "mapping"),
    ({"model": [[[[1]]]]}, "model", "mapping"),
    ({"model": {"weights": ""}}, "model.weights", "empty"),
    ({"model": {"weights": "/a\x00b"}}, "model.weights", "format"),
    ({"model": {"weights": "/" + "a" * 5000}}, "model.weights", "longer than 4096"),
    ({"data": {"dataset": "digits", "root": "/data"}}, "data.root", "only used"),
    ({"data": {"dataset": "imagefolder"}}, "data.root", "required"),
    ({"training": {"scheduler": "onecycle", "warmup_epochs": 2}}, "training.warmup_epochs", "onecycle"),
    ({1: {}}, "1", "keys must be strings"),
    ({"training": {"lr": "\ud800"}}, "training.lr", "number"),
    ({"model": {"\ud800x": 1}}, "model", "Unicode"),             # a key with a lone surrogate
    ({"training": {"optimizer": "rmsprop\ud800"}}, "training.optimizer", "Unicode"),
    ({"training": {"optimizer": "évian"}}, "training.optimizer", "'évian'"),
    ({"model": {"dropout": 0.5, "x" * 10_000: 1}}, "model." + "x" * 77 + "...", "unknown key"),
])
def test_odd_values_name_their_field(data, field, words):
    errors = errors_of(data)
    assert field in errors and words in errors[field], errors


@pytest.mark.parametrize("data", [None, [], "config", 3, [("model", {})], {"model": "small_cnn"}])
def test_a_config_that_is_not_a_mapping_is_a_field_error(data):
    errors = errors_of(data)
    assert len(errors) == 1 and "mapping" in next(iter(errors.values()))


def test_many_unknown_keys_give_a_bounded_list():
    with pytest.raises(ConfigError) as info:
        parse_config({f"k{i}": i for i in range(5000)})
    assert len(info.value.errors) == 101 and "4900 more" in info.value.errors[-1].message


def test_unknown_kind_is_a_field_error():
    for kind in ("sweep!", None, ["train"], 10**5000, "\ud800"):
        assert list(errors_of({}, kind)) == ["kind"]


def test_deeply_nested_input_is_a_field_error_not_a_recursion_error():
    deep: object = 1
    for _ in range(100_000):
        deep = [deep]
    assert list(errors_of({"model": {"name": deep}})) == ["model.name"]
    assert list(errors_of({"model": deep})) == ["model"]
    assert "model.x" in errors_of(apply_overrides({"model": {"x": deep}}, ["training.lr=0.1"]))


def test_overrides_copy_only_what_they_change_and_refuse_odd_yaml():
    base = {"training": {"lr": 0.1}, "data": {"dataset": "digits"}}
    out = apply_overrides(base, ["training.lr=0.2", "model.name=mlp"])
    assert base == {"training": {"lr": 0.1}, "data": {"dataset": "digits"}}
    assert out["training"]["lr"] == 0.2 and out["model"] == {"name": "mlp"} and out["data"] is base["data"]
    for bad in ("training.lr=2001-02-30", "training.lr=!!float abc", "training.amp=!!bool maybe",
                "training.lr=[unclosed", "training.epochs=" + "9" * 5000):
        with pytest.raises(ConfigError) as info:
            load_config({}, [bad])
        assert [e.field for e in info.value.errors] == [bad.partition("=")[0]]


@pytest.mark.parametrize("text", ["training: {lr: 2001-02-30}", "training: {lr: !!float abc}",
                                  "training: {epochs: " + "9" * 5000 + "}", "training: {lr: .nan}",
                                  "model: {name: !!binary aGVsbG8=}", "training: {lr: 2001-12-14}", "[1, 2]"])
def test_odd_yaml_files_are_config_errors(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_valid_configs_round_trip_through_plain_data_and_yaml():
    for path in sorted(Path(ROOT / "configs").rglob("*.yaml")):
        kind = "predict" if isinstance(yaml.safe_load(path.read_text()).get("model"), str) else "train"
        cfg = parse_config(yaml.safe_load(path.read_text()), kind)
        assert parse_config(to_dict(cfg), kind) == cfg
        assert parse_config(yaml.safe_load(dump_yaml(cfg)), kind) == cfg
        json.dumps(to_dict(cfg))


def test_configs_stay_frozen_dataclasses_that_validate_on_construction():
    cfg = load_config({})
    assert dataclasses.is_dataclass(cfg) and cfg.training.processes == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.lr = 1.0  # type: ignore[misc]
    assert dataclasses.replace(cfg.model, num_classes=7).num_classes == 7
    with pytest.raises(ValueError, match="unknown model 'lenet'"):
        ModelConfig(name="lenet")
    with pytest.raises(ValueError):
        dataclasses.replace(cfg.model, num_classes=10**9)
