"""configs.paths: a config's local paths resolve (symlinks followed) under the operator's data roots or are refused."""
from __future__ import annotations

import os

import pytest

from configs import ConfigError, Settings
from configs.paths import check_paths, config_paths, resolve_under, split_roots, with_paths


@pytest.fixture
def tree(tmp_path):
    """data/ (the allowed root) with flowers/ and w.pt; data2/ beside it; outside/ with secrets."""
    (tmp_path / "data" / "flowers" / "a").mkdir(parents=True)
    (tmp_path / "data" / "w.pt").write_bytes(b"w")
    (tmp_path / "data2").mkdir()
    (tmp_path / "outside" / "secret").mkdir(parents=True)
    return tmp_path


def train(root=None, weights=None) -> dict:
    return {"model": {"name": "small_cnn", "weights": weights},
            "data": {"dataset": "imagefolder" if root else "digits", "root": root}}


def test_roots_come_from_an_os_pathsep_separated_setting(tree, monkeypatch):
    raw = os.pathsep.join([str(tree / "data"), "", str(tree / "data2") + "/"])
    assert split_roots(raw) == (str(tree / "data"), str(tree / "data2"))
    assert Settings.from_env({"KILN_DATA_ROOTS": raw}).data_root_paths == split_roots(raw)
    assert Settings().data_roots == "" and Settings().data_root_paths == ()
    assert Settings(data_roots=raw).env()["KILN_DATA_ROOTS"] == raw


def test_paths_under_a_root_resolve_to_their_real_path(tree):
    roots = split_roots(str(tree / "data"))
    root, weights = str(tree / "data" / "flowers"), str(tree / "data" / "w.pt")
    assert check_paths("train", train(root, weights), roots) == {"data.root": root, "model.weights": weights}
    assert resolve_under(str(tree / "data"), roots) == str(tree / "data")  # the root itself
    assert resolve_under(str(tree / "data" / "not-yet"), roots) == str(tree / "data" / "not-yet")


@pytest.mark.parametrize("path", ["outside", "outside/secret", "data2", "data/../outside", "data/flowers/../../outside",
                                  "/etc", "/proc/self/environ", "/", "relative/path", "data"])
def test_paths_outside_the_roots_are_refused_naming_the_field(tree, path):
    roots = split_roots(str(tree / "data"))
    full = path if path.startswith("/") or path.startswith("relative") else str(tree / path)
    if path == "data":
        full = "data"  # relative, even though a folder of that name is a root
    with pytest.raises(ConfigError) as info:
        check_paths("train", train(full, full), roots)
    assert {e.field for e in info.value.errors} == {"data.root", "model.weights"}
    for e in info.value.errors:
        assert "secret" not in e.message and str(tree) not in e.message  # no listing, no roots


def test_a_symlink_under_a_root_that_points_outside_is_refused(tree):
    roots = split_roots(str(tree / "data"))
    (tree / "data" / "escape").symlink_to(tree / "outside")
    (tree / "data" / "etc").symlink_to("/etc")
    (tree / "data" / "env.pt").symlink_to("/proc/self/environ")
    for link in ("escape", "escape/secret", "etc", "env.pt"):
        with pytest.raises(ConfigError):
            check_paths("train", train(str(tree / "data" / link)), roots)
    # and a link outside the roots that points inside is judged by where it points
    (tree / "outside" / "in").symlink_to(tree / "data" / "flowers")
    assert check_paths("train", train(str(tree / "outside" / "in")), roots) == {
        "data.root": str(tree / "data" / "flowers")}


def test_a_symlinked_root_is_compared_by_its_real_path(tree):
    (tree / "alias").symlink_to(tree / "data")
    roots = split_roots(str(tree / "alias"))
    assert check_paths("train", train(str(tree / "data" / "flowers")), roots) == {
        "data.root": str(tree / "data" / "flowers")}
    assert check_paths("train", train(str(tree / "alias" / "flowers")), roots) == {
        "data.root": str(tree / "data" / "flowers")}


def test_without_roots_every_path_is_refused_and_the_message_says_what_to_do(tree):
    with pytest.raises(ConfigError) as info:
        check_paths("train", train(str(tree / "data" / "flowers")), ())
    assert [e.field for e in info.value.errors] == ["data.root"]
    assert "POST /v1/datasets" in info.value.errors[0].message
    assert check_paths("train", train(), ()) == {}  # built-in and uploaded datasets need no root


def test_predict_configs_have_only_a_data_root(tree):
    roots = split_roots(str(tree / "data"))
    predict = {"model": "digits@production", "data": {"dataset": "imagefolder", "root": str(tree / "outside")}}
    assert config_paths("predict", predict) == [("data.root", str(tree / "outside"))]
    with pytest.raises(ConfigError):
        check_paths("predict", predict, roots)
    assert config_paths("predict", {"model": "x", "data": "odd"}) == []


def test_odd_paths_are_refused_not_raised(tree):
    roots = split_roots(str(tree / "data"))
    for path in (str(tree / "data") + "/a\x00b", "/" + "a" * 5000, "", "~/data"):
        with pytest.raises(ConfigError):
            check_paths("train", train(path or None, path), roots)
    # a long path under a root is a path under a root (the config schema bounds the length)
    deep = str(tree / "data") + "/x" * 3000
    assert check_paths("train", train(deep), roots) == {"data.root": deep}


def test_with_paths_replaces_only_the_named_fields():
    config = {"model": {"name": "mlp", "weights": "/a/w.pt"}, "data": {"dataset": "imagefolder", "root": "/a/r"}}
    out = with_paths(config, {"data.root": "/real/r"})
    assert out["data"] == {"dataset": "imagefolder", "root": "/real/r"} and out["model"] is config["model"]
    assert config["data"]["root"] == "/a/r"
