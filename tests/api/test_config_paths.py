"""Paths in job configs over HTTP: refused at submit unless under KILN_DATA_ROOTS (symlinks followed),
and checked again by the worker before the job opens anything."""
from __future__ import annotations

import dataclasses

import pytest

from tests.api.conftest import error_of
from tests.conftest import running_app


@pytest.fixture
def tree(tmp_path):
    """data/ (the allowed root) with flowers/<class>/ and w.pt; data2/ beside it; outside/ with a secret."""
    for cls in ("a", "b"):
        (tmp_path / "data" / "flowers" / cls).mkdir(parents=True)
    (tmp_path / "data" / "w.pt").write_bytes(b"w")
    (tmp_path / "data2" / "x").mkdir(parents=True)
    (tmp_path / "outside" / "private-folder").mkdir(parents=True)
    (tmp_path / "outside" / "private-folder" / "key.txt").write_text("do-not-show")
    return tmp_path


@pytest.fixture
def roots_settings(api_settings, tree):
    return dataclasses.replace(api_settings, data_roots=str(tree / "data"))


@pytest.fixture
def roots_client(roots_settings):
    with running_app(roots_settings) as app:
        yield app.test_client()


def folder_job(root: str, **model) -> dict:
    return {"kind": "train", "config": {"model": {"name": "small_cnn", **model},
                                        "data": {"dataset": "imagefolder", "root": root}}}


def assert_refused(resp, field: str) -> dict:
    err = error_of(resp, 422)
    assert [d["field"] for d in err["details"]] == [field]
    text = resp.get_data(as_text=True)
    assert "private-folder" not in text and "do-not-show" not in text  # nothing read from disk shows
    return err


@pytest.mark.parametrize("root", ["/etc", "/", "/proc/self", "relative/flowers", "/tmp"])
def test_without_data_roots_every_local_path_is_refused(client, root):
    err = assert_refused(client.post("/v1/jobs", json=folder_job(root)), "data.root")
    assert "POST /v1/datasets" in err["details"][0]["message"] or "absolute" in err["details"][0]["message"]
    assert client.get("/v1/jobs").get_json()["total"] == 0


@pytest.mark.parametrize("weights", ["/proc/self/environ", "/etc/passwd", "/dev/zero"])
def test_model_weights_cannot_probe_files(client, weights):
    body = {"kind": "train", "config": {"model": {"weights": weights}, "data": {"dataset": "digits"}}}
    assert_refused(client.post("/v1/jobs", json=body), "model.weights")


def test_a_predict_job_over_a_host_folder_is_refused(client):
    body = {"kind": "predict", "config": {"model": "digits@production",
                                          "data": {"dataset": "imagefolder", "root": "/etc"}}}
    assert_refused(client.post("/v1/jobs", json=body), "data.root")


def test_paths_under_a_data_root_are_accepted(roots_client, tree):
    root, weights = str(tree / "data" / "flowers"), str(tree / "data" / "w.pt")
    resp = roots_client.post("/v1/jobs", json=folder_job(root, weights=weights))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    config = resp.get_json()["config"]
    assert config["data"]["root"] == root and config["model"]["weights"] == weights


@pytest.mark.parametrize("where", ["outside", "outside/private-folder", "data2", "data/../outside",
                                   "data/flowers/../../data2/x", "data-link-out", "data/link-out",
                                   "data/link-out/private-folder"])
def test_paths_escaping_the_data_roots_are_refused(roots_client, tree, where):
    (tree / "data" / "link-out").symlink_to(tree / "outside")
    (tree / "data-link-out").symlink_to(tree / "outside")
    for body, field in ((folder_job(str(tree / where)), "data.root"),
                        ({"kind": "train", "config": {"model": {"weights": str(tree / where)}}}, "model.weights"),
                        ({"kind": "predict", "config": {"model": "digits", "data": {
                            "dataset": "imagefolder", "root": str(tree / where)}}}, "data.root")):
        err = assert_refused(roots_client.post("/v1/jobs", json=body), field)
        assert str(tree / "data") not in err["message"]  # the roots themselves are not disclosed


def test_a_symlink_into_a_root_is_judged_by_its_target(roots_client, tree):
    (tree / "outside" / "in").symlink_to(tree / "data" / "flowers")
    resp = roots_client.post("/v1/jobs", json=folder_job(str(tree / "outside" / "in")))
    assert resp.status_code == 202, resp.get_data(as_text=True)


# ---------------------------------------------------------------- the worker checks again

def run_in_worker(kiln, settings, job: dict):
    """worker.jobrun.run_job for ``job`` with ``settings`` (this worker's roots); (outcome, config the runner saw)."""
    from worker.jobrun import run_job
    from worker.runner import Context

    seen = {}

    def runner(run):
        seen.update(run.job["config"])
        return "completed"

    ctx = Context(settings, kiln.store, kiln.storage, worker_name="test-host", launch="inline")
    return run_job(job, ctx, "test-owner", runner, ()), seen


def test_the_worker_refuses_a_path_its_own_roots_do_not_allow(roots_settings, tree):
    with running_app(roots_settings) as roots_app:
        kiln = roots_app.extensions["kiln"]
        job = kiln.submit_job("train", folder_job(str(tree / "data" / "flowers"))["config"])
        outcome, seen = run_in_worker(kiln, dataclasses.replace(roots_settings, data_roots=""), job)
        assert seen == {} and "data.root" in outcome.error and "not allowed" in outcome.error
        outcome, seen = run_in_worker(kiln, roots_settings, job)
        assert outcome.error is None and seen["data"]["root"] == str(tree / "data" / "flowers")


def test_a_symlink_repointed_after_submit_is_caught_by_the_worker(roots_settings, tree):
    link = tree / "data" / "current"
    link.symlink_to(tree / "data" / "flowers")
    with running_app(roots_settings) as roots_app:
        kiln = roots_app.extensions["kiln"]
        job = kiln.submit_job("train", folder_job(str(link), weights=str(tree / "data" / "w.pt"))["config"])
        link.unlink()
        link.symlink_to(tree / "outside")
        outcome, seen = run_in_worker(kiln, roots_settings, job)
        assert seen == {} and "data.root" in outcome.error and "private-folder" not in outcome.error
        # repointed inside again: the runner gets the real paths, not the link
        link.unlink()
        link.symlink_to(tree / "data" / "flowers")
        outcome, seen = run_in_worker(kiln, roots_settings, job)
        assert seen["data"]["root"] == str(tree / "data" / "flowers")
        assert seen["model"]["weights"] == str(tree / "data" / "w.pt")
