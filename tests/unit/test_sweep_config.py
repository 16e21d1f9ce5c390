"""Sweep configs: validation names the sweep's field, drawing is seeded, a grid is the product of its
values; the register gate of a training config; the successive-halving cutoff."""
from __future__ import annotations

import math

import pytest

from configs import ConfigError, parse_config, to_dict
from configs.sweep import draw_trials, sweep_dict, trial_config, trial_values
from worker.promote import check_gate
from worker.sweeps import cutoff, worse

SWEEP = {"base": {"data": {"image_size": 8}, "training": {"epochs": 3}},
         "space": {"training.lr": {"log_uniform": [1e-4, 1e-1]}, "training.batch_size": {"values": [32, 64]}},
         "method": "random", "trials": 8, "seed": 0, "metric": "val_accuracy", "mode": "max",
         "halving": {"rungs": [1, 3], "keep": 0.5}}


def fields(data: dict, kind: str = "sweep") -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, kind)
    return {e.field: e.message for e in err.value.errors}


def test_the_design_example_validates_and_draws_its_trials():
    cfg = parse_config(SWEEP, "sweep")
    trials = draw_trials(cfg)
    assert len(trials) == 8
    for values in trials:
        assert set(values) == {"training.lr", "training.batch_size"}
        assert 1e-4 <= values["training.lr"] <= 1e-1 and values["training.batch_size"] in (32, 64)
        config = trial_config(cfg, values)
        assert config.training.lr == values["training.lr"] and config.data.image_size == 8
    assert len({v["training.lr"] for v in trials}) == 8  # continuous draws differ


def test_the_same_config_draws_the_same_trials_whatever_its_key_order():
    again = {"space": dict(reversed(list(SWEEP["space"].items()))), **{k: v for k, v in SWEEP.items() if k != "space"}}
    assert draw_trials(parse_config(SWEEP, "sweep")) == draw_trials(parse_config(again, "sweep"))
    other = draw_trials(parse_config({**SWEEP, "seed": 1}, "sweep"))
    assert other != draw_trials(parse_config(SWEEP, "sweep"))


def test_log_uniform_draws_spread_over_the_decades():
    cfg = parse_config({**SWEEP, "trials": 64, "space": {"training.lr": {"log_uniform": [1e-4, 1e-1]}}}, "sweep")
    decades = {math.floor(math.log10(v["training.lr"])) for v in draw_trials(cfg)}
    assert decades == {-4, -3, -2}


def test_int_uniform_includes_both_ends():
    cfg = parse_config({**SWEEP, "trials": 64, "space": {"training.batch_size": {"int_uniform": [16, 18]}}}, "sweep")
    assert {v["training.batch_size"] for v in draw_trials(cfg)} == {16, 17, 18}


def test_grid_is_the_product_of_the_values_in_order():
    cfg = parse_config({**SWEEP, "method": "grid", "space": {
        "training.lr": {"values": [0.01, 0.001]}, "training.batch_size": {"values": [32, 64]}}}, "sweep")
    assert draw_trials(cfg) == [
        {"training.batch_size": 32, "training.lr": 0.01}, {"training.batch_size": 32, "training.lr": 0.001},
        {"training.batch_size": 64, "training.lr": 0.01}, {"training.batch_size": 64, "training.lr": 0.001}]


@pytest.mark.parametrize("change, field, words", [
    ({"space": {"training.nope": {"values": [1]}}}, "space.training.nope", "not a training-config field"),
    ({"space": {"register.name": {"values": ["x"]}}}, "space.register.name", "not a training-config field"),
    ({"space": {"training.lr": {"values": [100]}}}, "space.training.lr", "must be <= 10"),
    ({"space": {"training.batch_size": {"uniform": [16, 64]}}}, "space.training.batch_size", "integer"),
    ({"space": {"training.lr": {"values": [0.1], "uniform": [0.1, 0.2]}}}, "space.training.lr", "exactly one"),
    ({"space": {"training.lr": {}}}, "space.training.lr", "exactly one"),
    ({"space": {"training.lr": {"uniform": [0.2, 0.1]}}}, "space.training.lr.uniform", "below high"),
    ({"space": {"training.lr": {"log_uniform": [0, 0.1]}}}, "space.training.lr.log_uniform", "> 0"),
    ({"space": {}}, "space", ""),
    ({"method": "grid"}, "space.training.lr", "grid search takes values only"),
    ({"method": "grid", "trials": 3, "space": {"training.batch_size": {"values": [8, 16]},
                                               "training.lr": {"values": [0.1, 0.01]}}}, "trials", "4 combinations"),
    ({"method": "bayes"}, "method", "grid"),
    ({"trials": 65}, "trials", "<= 64"),
    ({"mode": "up"}, "mode", "max"),
    ({"metric": "accuracy"}, "metric", "val_accuracy"),
    ({"halving": {"rungs": [3, 1]}}, "halving.rungs", "increasing"),
    ({"halving": {"rungs": [1, 4]}}, "halving.rungs", "past base.training.epochs"),
    ({"halving": {"rungs": [1], "keep": 1.0}}, "halving.keep", "< 1"),
    ({"base": {"training": {"lr": -1}}}, "base.training.lr", "> 0"),
    ({"base": {"register": {"name": "digits"}}}, "base.register", "not registered"),
    ({"bogus": 1}, "bogus", "unknown key"),
])
def test_a_bad_sweep_names_its_field(change, field, words):
    found = fields({**SWEEP, **change})
    assert field in found, found
    assert words in found[field]


def test_the_stored_sweep_parses_again_as_it_is():
    cfg = parse_config(SWEEP, "sweep")
    plain = sweep_dict(cfg)
    assert plain["space"] == SWEEP["space"] and parse_config(plain, "sweep") == cfg


def test_a_sweep_needs_a_space():
    assert "space" in fields({"base": {}})


def test_trial_values_read_back_from_a_trial_config():
    cfg = parse_config(SWEEP, "sweep")
    values = draw_trials(cfg)[0]
    assert trial_values(SWEEP["space"], to_dict(trial_config(cfg, values))) == values


def test_register_gate_validates():
    cfg = parse_config({"register": {"name": "digits", "alias": "production",
                                     "require": {"val_accuracy": {"min": 0.97}}}}, "train")
    assert cfg.register.name == "digits" and cfg.register.require["val_accuracy"] == {"min": 0.97}
    assert parse_config({}, "train").register is None
    assert "register.require" in fields({"register": {"name": "d", "require": {"val_accuracy": {"mn": 1}}}}, "train")
    assert "register.require" in fields({"register": {"name": "d", "require": {"val_loss": {"max": None}}}}, "train")
    again = to_dict(cfg)  # the stored config parses again as it is
    assert again["register"]["require"] == {"val_accuracy": {"min": 0.97}} and parse_config(again, "train") == cfg
    assert "register.name" in fields({"register": {"name": "bad name"}}, "train")
    assert "register.require" in fields({"register": {"name": "d", "require": {"f1": {"min": 1}}}}, "train")
    assert "register.name" in fields({"register": {}}, "train")


def test_gate_check_says_why():
    require = {"val_accuracy": {"min": 0.97}, "val_loss": {"max": 0.5}}
    assert check_gate(require, {"val_accuracy": 0.98, "val_loss": 0.1}) == []
    assert check_gate(require, {"val_accuracy": 0.91, "val_loss": 0.1}) == ["val_accuracy 0.91 < min 0.97"]
    assert check_gate(require, {"val_accuracy": 0.99}) == ["val_loss was not recorded"]
    assert check_gate({}, {}) == []
    assert check_gate({"val_loss": {}}, {"val_accuracy": 0.5}) == ["val_loss was not recorded"]
    assert check_gate({"val_loss": {"min": 0.2, "max": 0.1}}, {"val_loss": 0.15}) == [
        "val_loss 0.15 < min 0.2", "val_loss 0.15 > max 0.1"]


def test_halving_cutoff_is_a_quantile_of_the_others():
    assert cutoff([0.9], 0.5, "max") is None  # fewer than two others: nobody is stopped
    assert cutoff([0.8, 0.9], 0.5, "max") == pytest.approx(0.85)
    assert worse(0.84, 0.85, "max") and not worse(0.85, 0.85, "max")
    assert cutoff([0.1, 0.2, 0.3, 0.4, 0.5], 0.25, "max") == pytest.approx(0.4)  # keep the top quarter
    assert cutoff([1.0, 2.0, 3.0], 0.5, "min") == pytest.approx(2.0)
    assert worse(2.5, 2.0, "min") and not worse(1.5, 2.0, "min")
