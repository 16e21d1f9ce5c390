"""Predictor: load -> preprocess -> infer -> postprocess on a real (briefly trained) model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ml.inference import Predictor


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor.from_checkpoint(trained)


def test_result_shape(predictor):
    out = predictor.predict(Image.new("L", (8, 8), 128), top_k=3)
    assert set(out) == {"label", "index", "top_k"}
    assert len(out["top_k"]) == 3 and out["top_k"][0]["index"] == out["index"]
    probs = [t["probability"] for t in out["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert out["label"] == predictor.classes[out["index"]]
    assert len(predictor.predict(np.zeros((4, 4)), top_k=1000)["top_k"]) == len(predictor.classes)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_every_image_mode_becomes_model_channels(predictor, mode):
    image = Image.new(mode, (20, 12))
    x = predictor.preprocess([image])
    assert x.shape == (1, predictor.in_channels, predictor.image_size, predictor.image_size)
    assert x.dtype == torch.float32
    assert predictor.predict(image)["label"] in predictor.classes


@pytest.mark.parametrize("value", [
    np.zeros((8, 8)), np.zeros((8, 8, 1)), np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8, 4)),
    [[0, 255], [255, 0]], torch.rand(1, 8, 8), torch.rand(3, 8, 8),
])
def test_arrays_lists_and_tensors(predictor, value):
    assert predictor.preprocess([value]).shape[1:] == (predictor.in_channels, 16, 16)


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 4), np.nan), "NaN or Inf"), (np.full((4, 4), np.inf), "NaN or Inf"),
    (np.zeros((4, 4, 2)), "channels"), (np.zeros((2, 4, 4, 1)), "shape"), (np.zeros((0, 4)), "empty"),
    ([[1, 2], [3]], "rectangular"), ([["a"]], "rectangular"), (np.zeros((4, 4)) + 300, "0..255"),
    (torch.rand(3, 3), "tensor"), (torch.rand(2, 4, 4), "channels"), (torch.full((1, 2, 2), 2.0), "0..1"),
    ("not pixels", "unsupported"), (np.array([["x"]]), "dtype"),
])
def test_bad_inputs_raise_value_error_naming_the_input(predictor, bad, message):
    with pytest.raises(ValueError, match=message) as info:
        predictor.predict_batch([np.zeros((4, 4)), bad])
    assert str(info.value).startswith("input 1:")
    with pytest.raises(ValueError, match="no inputs"):
        predictor.preprocess([])


def test_same_output_as_the_model_on_the_eval_transform(predictor, trained):
    from ml.checkpoint import load_checkpoint
    from ml.data import eval_transform

    ckpt = load_checkpoint(trained)
    norm = ckpt["normalization"]
    transform = eval_transform(ckpt["image_size"], ckpt["in_channels"], norm["mean"], norm["std"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (11, 9), dtype=np.uint8), "L")
    with torch.inference_mode():
        expected = torch.softmax(predictor.model(transform(image)[None]), dim=1)[0]
    got = predictor.predict(image, top_k=len(predictor.classes))
    for t in got["top_k"]:
        assert t["probability"] == pytest.approx(float(expected[t["index"]]), abs=1e-5)


def test_predict_batch_in_chunks_matches_single_predictions(predictor):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (8, 8)).astype(np.float64) for _ in range(7)]
    batch = predictor.predict_batch(images, top_k=2, batch_size=3)
    single = [predictor.predict(x, top_k=2) for x in images]
    assert [b["index"] for b in batch] == [s["index"] for s in single]
    for b, s in zip(batch, single):
        assert b["top_k"][0]["probability"] == pytest.approx(s["top_k"][0]["probability"], abs=1e-5)
    assert predictor.predict_batch([]) == []


def test_registered_model_pt_and_safetensors_give_the_same_answers(registered, predictor):
    from pathlib import Path

    resolved = registered.resolve_model("digits:1")
    torch.load(resolved["path"], weights_only=True)  # plain data only
    from_pt = Predictor.from_checkpoint(resolved["path"])
    from_st = Predictor.from_checkpoint(Path(resolved["path"]).with_name("model.safetensors"))
    x = [np.random.default_rng(2).integers(0, 256, (8, 8)).astype(float)]
    want = predictor.predict_batch(x, top_k=3)
    assert from_pt.predict_batch(x, top_k=3) == want
    assert from_st.predict_batch(x, top_k=3) == want
    assert from_pt.classes == predictor.classes and from_st.image_size == predictor.image_size
