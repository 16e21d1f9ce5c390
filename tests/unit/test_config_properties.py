"""Property-based tests of the config validator: any JSON- or YAML-like input gives a config or a
ConfigError (nothing else), valid configs round-trip, and the published JSON Schema accepts exactly
what the validator accepts."""
from __future__ import annotations

import datetime
import json
import math

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from configs import (
    ConfigError, PredictConfig, TrainConfig, apply_overrides, dump_yaml, json_schema, parse_config, to_dict,
)

CHECK = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = {"train": TrainConfig, "predict": PredictConfig}

# JSON as a client can send it. Floats are finite and not integral, text has no trailing newline:
# JSON has no NaN; 2.0 is an "integer" to JSON Schema but the validator's ints are strict; and the
# jsonschema library matches "$" with Python's re.search (a newline before the end passes), where
# JSON Schema's own regex dialect (ECMA 262) and the validator do not.
huge_ints = st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1, 10**18])
json_text = st.text(max_size=12).filter(lambda s: not s.endswith("\n"))
any_text = st.text(st.characters(codec=None), max_size=12)  # lone surrogates included, as JSON allows
json_scalars = (st.none() | st.booleans() | st.integers() | huge_ints | json_text
                | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(json_text, inner, max_size=3), max_leaves=8)
# What PyYAML adds: NaN and infinities, bytes (!!binary), dates, sets, tuples (!!pairs), integral floats.
yaml_scalars = (json_scalars | st.floats() | st.binary(max_size=8) | st.dates() | st.datetimes()
                | any_text | st.frozensets(st.integers(), max_size=2))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.tuples(inner, inner) | st.dictionaries(any_text, inner, max_size=3)
                           | st.dictionaries(st.integers() | st.none() | st.booleans(), inner, max_size=2),
                           max_leaves=8)

SAMPLES = {"model": ["digits", "digits@production", "digits:3", "digits:0"], "dataset": ["0" * 32, "f" * 31],
           "root": ["/data/flowers", "relative/path"], "weights": ["/w.pt"], "device": ["cuda:63", "cuda:64", "cpu"]}


def edge_values(name: str, schema: dict) -> list:
    """Values at and around what the field's schema documents: enums, consts, bounds, default."""
    out = list(SAMPLES.get(name, []))
    if "default" in schema:
        out.append(schema["default"])
    for variant in schema.get("anyOf", [schema]):
        out += variant.get("enum", []) + ([variant["const"]] if "const" in variant else [])
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in variant:
                bound = variant[key]
                step = 1 if variant.get("type") == "integer" else 0.5
                out += [bound, bound - step, bound + step]
    return out


def shaped(schema: dict, values) -> st.SearchStrategy:
    """Mappings shaped like ``schema``: some known keys (edge or arbitrary values), now and then an unknown one."""
    fields = {}
    for name, sub in schema["properties"].items():
        inner = shaped(sub, values) if "properties" in sub else st.sampled_from(edge_values(name, sub))
        fields[name] = inner | values
    known = st.fixed_dictionaries({}, optional=fields)
    extra = st.just({}) | st.dictionaries(json_text, values, max_size=2)
    return st.tuples(known, extra).map(lambda pair: {**pair[1], **pair[0]})


def check_outcome(data, kind: str):
    """parse_config gives a config of the kind's class or a well-formed ConfigError; never anything else."""
    try:
        cfg = parse_config(data, kind)
    except ConfigError as exc:
        assert 1 <= len(exc.errors) <= 101
        for e in exc.errors:
            assert isinstance(e.field, str) and e.field and len(e.field) <= 300
            assert isinstance(e.message, str) and e.message and len(e.message) <= 2000
            (e.field + e.message).encode("utf-8")  # no lone surrogates: logs and bodies can carry it
        json.dumps([e.to_dict() for e in exc.errors], ensure_ascii=False).encode("utf-8")
        str(exc)
        return None
    assert isinstance(cfg, KINDS[kind])
    return cfg


def assert_round_trips(cfg, kind: str) -> None:
    plain = to_dict(cfg)
    json.dumps(plain, allow_nan=False)
    assert parse_config(plain, kind) == cfg
    assert parse_config(yaml.safe_load(dump_yaml(cfg)), kind) == cfg
    for value in (v for section in plain.values() if isinstance(section, dict) for v in section.values()):
        assert not (isinstance(value, float) and not math.isfinite(value))


@pytest.mark.parametrize("kind", KINDS)
@CHECK
@given(data=st.data())
def test_structured_json_gives_a_config_or_field_errors_and_agrees_with_the_schema(kind, data):
    schema = json_schema(KINDS[kind])
    value = data.draw(shaped(schema, json_values))
    cfg = check_outcome(value, kind)
    if cfg is not None:
        assert_round_trips(cfg, kind)
    published = jsonschema.Draft202012Validator(schema).is_valid(value)
    assert published == (cfg is not None or refused_only_by_unpublished_rule(value, kind)), value


def refused_only_by_unpublished_rule(value, kind: str) -> bool:
    """The one rule the JSON Schema does not state (see configs.schema._cross_checks): the global
    batch size must be a multiple of training.processes."""
    try:
        parse_config(value, kind)
    except ConfigError as exc:
        return [(e.field, "multiple of training.processes" in e.message) for e in exc.errors] == [
            ("training.batch_size", True)]
    return False


@pytest.mark.parametrize("kind", KINDS)
@CHECK
@given(data=st.data())
def test_yaml_like_values_never_raise_anything_but_config_error(kind, data):
    value = data.draw(shaped(json_schema(KINDS[kind]), yaml_values) | yaml_values)
    cfg = check_outcome(value, kind)
    if cfg is not None:
        assert_round_trips(cfg, kind)


@CHECK
@given(kind=st.text(max_size=8) | st.integers() | st.none(), value=json_values)
def test_any_kind_and_any_document(kind, value):
    if kind not in KINDS:
        with pytest.raises(ConfigError) as info:
            parse_config(value, kind)
        assert [e.field for e in info.value.errors] == ["kind"]
    else:
        check_outcome(value, kind)


override_keys = st.lists(st.sampled_from(["model", "data", "training", "name", "lr", "epochs", "x", ""]),
                         min_size=1, max_size=3).map(".".join)
override_values = st.text(max_size=20) | st.sampled_from(
    ["2001-02-30", "!!float abc", "!!bool maybe", "9" * 5000, "[" * 50, "{a: [1, {b: 2}]}", ".nan", "*x", "&a 1"])


@CHECK
@given(base=shaped(json_schema(TrainConfig), json_values),
       overrides=st.lists(st.tuples(override_keys, st.sampled_from(["=", ""]), override_values).map("".join),
                          max_size=3))
def test_overrides_never_raise_anything_but_config_error_and_leave_the_input_alone(base, overrides):
    before = json.dumps(base, sort_keys=True, default=str)
    try:
        out = apply_overrides(base, overrides)
    except ConfigError:
        out = None
    assert json.dumps(base, sort_keys=True, default=str) == before
    if out is not None:
        check_outcome(out, "train")


def test_yaml_dates_and_sets_are_named_fields():
    """A sanity anchor for the YAML strategies: PyYAML's own types land as field errors."""
    with pytest.raises(ConfigError) as info:
        parse_config({"training": {"lr": datetime.date(2001, 12, 14), "epochs": {1, 2}}, "model": {"name": b"mlp"}})
    assert {e.field for e in info.value.errors} == {"training.lr", "training.epochs", "model.name"}
