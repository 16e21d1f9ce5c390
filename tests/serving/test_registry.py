"""Model registry: versions increment and never change, aliases move, refs resolve, errors name what is missing."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from worker.errors import InvalidInput, NotFound


def test_versions_increment_with_files_and_card(registry, trained, serve_settings):
    v1 = registry.register_checkpoint("digits", trained)
    v2 = registry.register_checkpoint("digits", trained, checkpoint="best")
    assert (v1["version"], v2["version"]) == (1, 2)
    folder = Path(serve_settings.storage) / "models" / "digits" / "1"
    card = json.loads((folder / "card.json").read_text())
    onnx = ["model.onnx"] if card["runtime"]["name"] == "onnxruntime" else []
    assert sorted(p.name for p in folder.iterdir()) == sorted(card["files"]) == ["card.json", *onnx, "model.pt",
                                                                                  "model.safetensors"]
    assert card["sha256"] == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest() == v1["sha256"]
    assert card["classes"] == [str(i) for i in range(10)] and card["version"] == 1
    assert {"mean", "std"} <= set(card["normalization"]) and card["config"]["model"]["name"] == "small_cnn"
    slim = torch.load(folder / "model.pt", weights_only=True)
    assert "optimizer" not in slim and {"model", "config", "classes", "normalization"} <= set(slim)
    assert v1["metrics"] == card["metrics"]


def test_versions_are_immutable(registry, trained, trained_last, serve_settings):
    registry.register_checkpoint("m", trained)
    before = (Path(serve_settings.storage) / "models/m/1/model.pt").read_bytes()
    registry.register_checkpoint("m", trained_last, checkpoint="last")
    assert (Path(serve_settings.storage) / "models/m/1/model.pt").read_bytes() == before
    assert [v["checkpoint"] for v in registry.get_model("m")["versions"]] == ["best", "last"]


def test_concurrent_registrations_get_distinct_versions(registry, trained):
    got, errors = [], []

    def register():
        try:
            got.append(registry.register_checkpoint("race", trained)["version"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == [1, 2, 3, 4]


def test_aliases_move_and_refs_resolve(registry, trained):
    for _ in range(3):
        registry.register_checkpoint("digits", trained)
    assert registry.resolve_model("digits")["version"] == 3  # no production alias: the latest
    registry.set_alias("digits", "production", 1)
    registry.set_alias("digits", "staging", 2)
    assert registry.resolve_model("digits")["version"] == 1  # production when it is set
    assert registry.resolve_model("digits@staging")["version"] == 2
    assert registry.resolve_model("digits:3")["version"] == 3
    model = registry.set_alias("digits", "production", 3)
    assert model["aliases"] == {"production": 3, "staging": 2}
    assert registry.resolve_model("digits@production")["version"] == 3
    resolved = registry.resolve_model("digits@production")
    assert Path(resolved["path"]).name == "model.pt" and Path(resolved["path"]).exists()
    assert resolved["card"]["version"] == 3
    listed = registry.list_models()["models"]
    assert [m["name"] for m in listed] == ["digits"]
    assert [v["aliases"] for v in listed[0]["versions"]] == [[], ["staging"], ["production"]]


@pytest.mark.parametrize("ref, message", [
    ("nope", "model 'nope' not found"), ("nope@production", "model 'nope' not found"),
    ("digits:9", "no version 9"), ("digits@canary", "no alias 'canary'"),
])
def test_unknown_refs_are_not_found_naming_which(registered, ref, message):
    with pytest.raises(NotFound, match=message):
        registered.resolve_model(ref)


def test_bad_names_and_missing_things(registered):
    with pytest.raises(InvalidInput):
        registered.resolve_model("bad name!")
    with pytest.raises(InvalidInput):
        registered.set_alias("digits", "../etc", 1)
    with pytest.raises(NotFound, match="no version 7"):
        registered.set_alias("digits", "production", 7)
    with pytest.raises(NotFound, match="not found"):
        registered.get_model("nope")
    with pytest.raises(NotFound, match="job"):
        registered.register_model("digits", "0" * 32)


def test_serving_runtimes_setting_picks_the_candidates(registry, serve_settings, trained):
    """KILN_SERVING_RUNTIMES="" measures nothing against eager: the card says eager serves;
    an unknown name is refused naming it."""
    import dataclasses

    from worker.errors import InvalidInput
    from worker.registry import Registry

    eager_only = Registry.from_settings(dataclasses.replace(serve_settings, serving_runtimes=""))
    eager_only.register_checkpoint("plain", trained)
    card = json.loads((Path(serve_settings.storage) / "models" / "plain" / "1" / "card.json").read_text())
    assert card["runtime"]["name"] == "eager" and not card["runtime"].get("file"), card["runtime"]
    with pytest.raises(InvalidInput, match="tensorrt"):
        Registry.from_settings(dataclasses.replace(serve_settings, serving_runtimes="onnxruntime, tensorrt"))
