"""training.profile: a torch.profiler trace of N steps as profile/trace.json, top operators in train.log."""
from __future__ import annotations

import json

import pytest

from configs import ConfigError, load_config
from ml.train import train
from tests.unit.conftest import tiny_config


def _trace(out) -> dict:
    return json.loads((out / "profile" / "trace.json").read_text())


def test_profile_of_three_steps_writes_a_chrome_trace_and_logs_the_top_operators(tmp_path):
    result = train(tiny_config("training.profile.steps=3"), tmp_path, console=False)
    assert result.status == "completed"
    trace = _trace(tmp_path)
    events = trace["traceEvents"]
    assert events and all("ph" in e for e in events)
    # three recorded steps (2 warm-up steps are not in the trace), each a ProfilerStep#N span
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert len(steps) == 3, steps
    assert any(e.get("name", "").startswith("aten::convolution") for e in events)
    log = (tmp_path / "train.log").read_text()
    assert "profile: trace of 3 steps in profile/trace.json; top 10 operators by self CPU time" in log
    table = log.split("top 10 operators by self CPU time:", 1)[1]
    assert "Self CPU %" in table and "aten::convolution_backward" in table
    assert not list((tmp_path / "profile").glob(".tmp-*"))


def test_a_run_shorter_than_the_profile_exports_what_it_recorded(tmp_path):
    # 2 epochs x 7 steps: 2 warm-up steps, then 12 of the 100 asked for; the run's end closes a 13th
    # span (validation and the last checkpoint, after the last step)
    train(tiny_config("training.profile.steps=100"), tmp_path, console=False)
    names = {e.get("name", "") for e in _trace(tmp_path)["traceEvents"]}
    assert sorted(int(n.split("#")[1]) for n in names if n.startswith("ProfilerStep#")) == list(range(2, 15))
    assert "profile: trace of 12 steps" in (tmp_path / "train.log").read_text()


def test_no_profile_by_default(tmp_path):
    train(tiny_config("training.epochs=1"), tmp_path, console=False)
    assert not (tmp_path / "profile").exists()
    assert "profil" not in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("steps", [0, 101, "3", 2.5])
def test_profile_steps_are_bounded(steps):
    with pytest.raises(ConfigError) as exc:
        load_config({"training": {"profile": {"steps": steps}}})
    assert [e.field for e in exc.value.errors] == ["training.profile.steps"]


def test_profile_defaults():
    assert load_config({}).training.profile is None
    assert load_config({"training": {"profile": {}}}).training.profile.steps == 5
