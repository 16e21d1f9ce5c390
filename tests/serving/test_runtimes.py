"""Serving runtimes: each agrees with eager on real digits, the build keeps the fastest that agrees and
says why in the card, and a version whose runtime cannot be built or loaded serves with eager and says so."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx.*")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    """best.pt of small_cnn trained on 1000 digits for 3 epochs (~0.9 accuracy: clear top-1 margins)."""
    import torch

    from configs import load_config
    from ml.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("digits")
    train(load_config({"model": {"name": "small_cnn"},
                       "data": {"dataset": "digits", "image_size": 16, "num_workers": 0, "subset": 1000},
                       "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "seed": 0, "log_every_steps": 100}}),
          out, console=False)
    return out / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def predictor(digits_model):
    from ml.inference import Predictor

    return Predictor.from_checkpoint(digits_model)


@pytest.fixture(scope="module")
def real_digits(predictor) -> np.ndarray:
    """The last 300 of scikit-learn's digits through the eval transform's uint8 half: [300,16,16,1]."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images[-300:] * 255 / 16).astype(np.uint8)
    return np.stack([predictor.prepare(Image.fromarray(x, "L"), i) for i, x in enumerate(images)])


@pytest.fixture(autouse=True)
def fresh_builds(monkeypatch):
    """No build remembered from another test (they reuse one set of weights)."""
    from ml import runtimes

    monkeypatch.setattr(runtimes, "_BUILT", OrderedDict())


@pytest.mark.parametrize("name", ["onnxruntime", "bf16", pytest.param("compile", marks=pytest.mark.slow)])
def test_every_runtime_agrees_with_eager_on_real_digits(name, predictor, real_digits, tmp_path):
    """Labels identical on 300 real digits (bf16: wherever its error could not swap the two best), probabilities
    within the runtime's stated tolerance, at one intra-op thread and at two."""
    from ml import runtimes

    expected = runtimes.EagerRuntime(predictor).probabilities(real_digits)
    if name == "onnxruntime":
        runtime = runtimes.OnnxRuntime(runtimes.export_onnx(predictor, tmp_path / runtimes.ONNX_FILE))
    else:  # bf16 runs emulated where the CPU has no native bf16: slow, but the numbers are the same
        runtime = runtimes.TorchGraphRuntime(predictor, name)
    for threads in (1, 2):
        got = runtime.probabilities(real_digits, threads)
        assert got.shape == expected.shape and got.dtype == np.float32
        check = runtimes.agreement(got, expected)
        assert check["max_abs_diff"] <= (runtimes.BF16_TOLERANCE if name == "bf16" else runtimes.TOLERANCE), check
        if name != "bf16":
            assert check["top1_identical"], check
            continue
        # bf16 keeps 8 mantissa bits: a label can only change where eager's two best are closer than twice
        # the difference, so that is where it may; its measured agreement is printed (it is opt-in for this)
        top2 = np.sort(expected, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * check["max_abs_diff"]
        assert (got.argmax(1) == expected.argmax(1))[clear].all(), check
        print(f"bf16 on {len(got)} real digits: top-1 agreement {check['top1_agreement']:.4f}, "
              f"max |dp| {check['max_abs_diff']:.2e}")
    if name != "bf16":  # the labels served are the eager model's, top-k included
        assert runtimes.top_k(got, 3)[1] == predictor.top_k(predictor.infer(predictor.batch(real_digits)), 3)[1]


def test_top_k_matches_the_predictor(predictor, real_digits):
    from ml import runtimes

    probs = predictor.infer(predictor.batch(real_digits))
    values, indices = runtimes.top_k(probs.numpy(), 5)
    want_values, want_indices = predictor.top_k(probs, 5)
    assert indices == want_indices and np.allclose(values, want_values, rtol=0, atol=0)


def test_the_build_keeps_the_fastest_runtime_that_agrees_and_the_card_says_why(predictor, tmp_path):
    from ml import runtimes

    section = runtimes.build(predictor, tmp_path, ("onnxruntime", "bf16"))
    measured = section["measured"]
    assert {"batch_1_ms", "batch_32_ms_per_input", "score_ms"} <= set(measured["eager"])
    usable = {n: m["score_ms"] for n, m in measured.items() if "score_ms" in m}
    assert section["name"] == min(usable, key=usable.get)
    assert section["name"] in section["reason"] and str(measured["eager"]["score_ms"]) in section["reason"]
    assert measured["onnxruntime"]["top1_identical"] and measured["onnxruntime"]["max_abs_diff"] <= 1e-4
    if not runtimes.native_bf16():
        assert "native bf16" in measured["bf16"]["skipped"]  # opt-in, and only where the CPU has it
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == (["model.onnx"] if section["name"] == "onnxruntime" else [])
    assert section["tolerance"] == runtimes.TOLERANCE and section["reference"]["inputs"] == 32


def test_outputs_that_disagree_are_rejected(predictor, tmp_path, monkeypatch):
    from ml import runtimes

    class Shifted(runtimes.EagerRuntime):
        def probabilities(self, arrays, threads=1):
            return np.roll(super().probabilities(arrays), 1, axis=1)  # fast, but another answer

    monkeypatch.setattr(runtimes, "_candidate", lambda name, predictor, out_dir: Shifted(predictor))
    section = runtimes.build(predictor, tmp_path, ("onnxruntime",))
    assert section["name"] == "eager" and "disagreed with eager" in section["reason"]
    assert not section["measured"]["onnxruntime"]["top1_identical"]
    assert "rejected" in section["measured"]["onnxruntime"]


def test_a_runtime_that_cannot_be_built_serves_with_eager_and_says_so(registry, digits_model, serve_settings,
                                                                     monkeypatch, digit_pngs):
    from ml import runtimes
    from web import create_app

    def broken(predictor, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtimes, "export_onnx", broken)
    registry.register_checkpoint("digits", digits_model)  # the build runs here (no forward process involved)
    folder = Path(serve_settings.storage) / "models/digits/1"
    card = json.loads((folder / "card.json").read_text())
    assert card["runtime"]["name"] == "eager" and card["runtime"]["file"] is None
    assert "exporter exploded" in card["runtime"]["measured"]["onnxruntime"]["error"]
    assert "onnxruntime could not be built" in card["runtime"]["reason"]
    assert not (folder / "model.onnx").exists() and "model.onnx" not in card["files"]
    app = create_app(serve_settings)
    try:
        resp = app.test_client().post("/predict?model=digits:1", data=digit_pngs[0][0], content_type="image/png")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["model"] == {"name": "digits", "version": 1, "runtime": "eager"}
    finally:
        app.extensions["kiln.serving"].close()


def test_a_runtime_file_that_will_not_load_serves_with_eager(registry, digits_model, serve_settings, digit_pngs):
    """The card chose ONNX Runtime but model.onnx is not a model any more: eager serves, and /predict says so."""
    from web import create_app

    registry.register_checkpoint("digits", digits_model)
    folder = Path(serve_settings.storage) / "models/digits/1"
    if json.loads((folder / "card.json").read_text())["runtime"]["name"] != "onnxruntime":
        pytest.skip("eager was measured faster here: no runtime file to break")
    (folder / "model.onnx").write_bytes(b"not protobuf")
    app = create_app(serve_settings)
    try:
        client = app.test_client()
        resp = client.post("/predict?model=digits:1", data=digit_pngs[0][0], content_type="image/png")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["model"]["runtime"] == "eager"
    finally:
        app.extensions["kiln.serving"].close()


def test_loading_a_version_and_its_runtime_unpickles_nothing(registry, digits_model, monkeypatch, real_digits):
    """model.pt through torch.load(weights_only=True), model.onnx as protobuf: with pickle's loaders
    made to fail, the version still loads and agrees with eager."""
    import pickle

    import onnx

    from ml import runtimes
    from ml.inference import Predictor

    registry.register_checkpoint("digits", digits_model)
    info = registry.resolve_model("digits:1")
    if info["runtime"]["name"] == "onnxruntime":
        graph = onnx.load(info["runtime"]["path"]).graph
        assert [i.name for i in graph.input] == ["inputs"]
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    predictor = Predictor.from_checkpoint(info["path"])
    if info["runtime"]["path"]:  # the runtime's file lies beside model.pt, where the forward process looks
        assert Path(info["runtime"]["path"]) == Path(info["path"]).with_name(runtimes.ONNX_FILE)
    runtime, fallback = runtimes.load(predictor, info["runtime"]["name"], Path(info["path"]).parent)
    assert fallback is None and runtime.name == info["runtime"]["name"]
    check = runtimes.agreement(runtime.probabilities(real_digits), runtimes.EagerRuntime(predictor)
                               .probabilities(real_digits))
    assert runtimes.agrees(check, runtimes.TOLERANCE), check


def test_cuda_graphs_that_cannot_be_built_leave_eager_serving_and_say_why(predictor):
    """On a CUDA device the runtime is chosen at load (bench/gpu_check.py checks the CUDA graphs themselves);
    a capture that fails, here for want of a device, serves eager with the reason."""
    from ml import runtimes

    with pytest.raises(RuntimeError, match="CUDA device"):
        runtimes.CudaGraphRuntime(predictor)
    runtime, why = runtimes.cuda_runtime(predictor)
    assert runtime.name == "eager" and why.startswith("cudagraph could not be built") and "CUDA device" in why
