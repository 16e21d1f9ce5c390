"""Data: deterministic stratified split, training-split statistics, the eval transform, sampler, folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from configs import load_config
from ml.data import EpochSampler, build_data, eval_transform, make_loader, split_indices
from ml.train import train
from tests.unit.conftest import tiny_config


def test_split_is_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), 40)
    tr, va = split_indices(labels, 0.25, seed=3)
    tr2, va2 = split_indices(labels, 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not set(tr) & set(va) and len(tr) + len(va) == 200 and len(va) == 50
    assert np.bincount(labels[va]).tolist() == [10] * 5
    assert not np.array_equal(split_indices(labels, 0.25, seed=4)[1], va)
    sub_tr, sub_va = split_indices(labels, 0.25, seed=3, subset=20)
    assert len(sub_tr) + len(sub_va) == 20


def test_normalisation_comes_from_the_training_split_only():
    b = build_data(tiny_config().data, seed=0)
    raw = b.train.x * torch.tensor(b.std).view(1, -1, 1, 1) + torch.tensor(b.mean).view(1, -1, 1, 1)
    assert raw.mean().item() == pytest.approx(b.mean[0], abs=1e-4)
    assert b.train.x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert b.val.x.mean().item() != pytest.approx(0.0, abs=1e-6)      # val stats are not used


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_eval_transform_converts_any_mode(mode, channels):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (11, 7, 3), dtype=np.uint8)).convert(mode)
    t = eval_transform(16, channels, [0.5] * channels, [0.25] * channels)(image)
    assert t.shape == (channels, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -2.0 and t.max() <= 2.0


@pytest.mark.parametrize("mode,channels,size", [("RGB", 3, 32), ("L", 1, 16), ("RGBA", 3, 20), ("P", 3, 32),
                                                ("RGB", 1, 8), ("L", 3, 32)])
def test_two_stage_eval_transform_is_bit_identical(mode, channels, size):
    """Serving's split (uint8 arrays per image, one normalise per batch) == the one-image transform."""
    rng = np.random.default_rng(1)
    tf = eval_transform(size, channels, [0.4] * channels, [0.3] * channels)
    images = [Image.fromarray(rng.integers(0, 256, (20 + i, 31, 3), dtype=np.uint8)).convert(mode)
              for i in range(4)]
    arrays = [tf.to_array(im) for im in images]
    assert all(a.dtype == np.uint8 and a.shape == (size, size, channels) for a in arrays)
    assert torch.equal(tf.batch(arrays), torch.stack([tf(im) for im in images]))
    assert tf.batch(np.stack(arrays), memory_format=torch.channels_last).is_contiguous(
        memory_format=torch.channels_last)


def test_eval_transform_equals_the_pretensorised_validation_data():
    from sklearn.datasets import load_digits

    b = build_data(tiny_config().data, seed=0)
    d = load_digits()
    tf = eval_transform(b.image_size, b.in_channels, b.mean, b.std)
    for k in (0, 5):
        img = Image.fromarray(np.rint(d.images[b.val_indices[k]] * 255 / 16).astype(np.uint8), "L")
        assert torch.equal(tf(img), b.val.x[k])


def test_sampler_order_is_a_function_of_seed_and_epoch_and_can_skip():
    s = EpochSampler(50, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=20)
    assert list(s) == full[20:]
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]
    assert sorted(i for i, _ in full) == list(range(50))


def test_augmentation_is_seeded_per_sample():
    b = build_data(tiny_config().data, seed=0)
    assert torch.equal(b.train[(3, 77)][0], b.train[(3, 77)][0])
    shifted = [b.train[(3, s)][0] for s in range(8)]
    assert any(not torch.equal(shifted[0], x) for x in shifted[1:])
    assert torch.equal(b.train[3][0], b.train.x[3])                    # plain index: no augmentation


def test_loader_settings_on_cpu():
    b = build_data(tiny_config().data, seed=0)
    loader = make_loader(b.train, 16, num_workers=1, device=torch.device("cpu"), seed=0)
    assert not loader.pin_memory and loader.persistent_workers and loader.worker_init_fn is not None
    x, y = next(iter(loader))
    assert x.shape == (16, 1, 16, 16)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            arr = np.clip(rng.normal(colour, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_imagefolder_and_uploaded_id_train(folder, tmp_path):
    cfg = load_config({"model": {"name": "small_cnn"},
                       "data": {"dataset": "0" * 32, "image_size": 16, "num_workers": 0},
                       "training": {"epochs": 2, "batch_size": 8}})
    with pytest.raises(ValueError, match="upload it first"):
        train(cfg, tmp_path / "missing", console=False)
    result = train(cfg, tmp_path / "run", dataset_roots={"0" * 32: str(folder)}, console=False)
    assert result.status == "completed" and result.best["val_accuracy"] >= 0.5
    b = build_data(load_config({"data": {"dataset": "imagefolder", "root": str(folder), "image_size": 16}}).data,
                   seed=0)
    assert b.classes == ["cat", "dog"] and b.in_channels == 3 and len(b.mean) == 3
    x, _ = b.train[(0, 5)]
    assert x.shape == (3, 16, 16)


def test_training_evaluation_and_batch_prediction_see_the_same_images(tmp_path):
    """One listing (ml.folders): .gif, hidden files and non-images are left out everywhere, and the
    order training indexes is the order predictions.jsonl is written in."""
    from ml.batch_predict import folder_samples
    from ml.data import folder_source

    rng = np.random.default_rng(0)
    for name in ("b/1.png", "b/0.jpg", "a/x.png", "a/sub/y.png", "a/z.gif", "a/.hidden.png", "a/notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(path)
    samples = folder_samples(tmp_path)
    assert [(s.path, s.label) for s in samples] == [("a/sub/y.png", "a"), ("a/x.png", "a"),
                                                     ("b/0.jpg", "b"), ("b/1.png", "b")]
    source = folder_source(str(tmp_path))
    assert source.classes == ["a", "b"] and source.labels.tolist() == [0, 0, 1, 1]
    for i, sample in enumerate(samples):
        assert np.array_equal(np.asarray(source.load(i)), np.asarray(sample.load()))
    with pytest.raises(ValueError, match="not among the classes"):
        folder_source(str(tmp_path), classes=["a"])
