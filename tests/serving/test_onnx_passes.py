"""ml.onnx_passes.crop_padding_taps: the cropped graph computes what the exported one does, with fewer taps."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ml.onnx_passes import crop_padding_taps

ort = pytest.importorskip("onnxruntime")
# The cropped Conv adds the same products minus zero terms, in another order: float32 rounding only.
TOLERANCE = 1e-5


def conv_model(size: tuple[int, int], kernel: tuple[int, int], stride: int, pads: list[int], seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[stride, stride], pads=pads,
                            kernel_shape=list(kernel))
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def kernel_of(model: onnx.ModelProto) -> list[int]:
    return list(model.graph.initializer[0].dims[2:])


CASES = [  # (input h, w), kernel, stride, pads [top, left, bottom, right], kernel expected after cropping
    ((1, 1), (3, 3), 1, [1, 1, 1, 1], [1, 1]),   # resnet's last stage on small images
    ((2, 2), (3, 3), 2, [1, 1, 1, 1], [2, 2]),   # the stride-2 conv into it
    ((1, 5), (3, 3), 1, [1, 1, 1, 1], [1, 3]),   # one axis only
    ((2, 2), (5, 5), 1, [2, 2, 2, 2], [3, 3]),
    ((3, 1), (7, 7), 2, [3, 3, 3, 3], [5, 1]),
    ((2, 2), (3, 3), 1, [1, 1, 1, 1], [3, 3]),   # every tap meets the input somewhere: unchanged
    ((8, 8), (3, 3), 2, [1, 1, 1, 1], [3, 3]),
    ((1, 1), (3, 3), 1, [0, 0, 2, 2], [1, 1]),   # lopsided padding
]


@pytest.mark.parametrize("size, kernel, stride, pads, expected", CASES)
def test_cropped_convs_compute_the_same(size, kernel, stride, pads, expected):
    model = conv_model(size, kernel, stride, pads, seed=1)
    x = np.random.default_rng(2).standard_normal((5, 3, *size)).astype(np.float32)
    before = run(model, x)
    cropped = crop_padding_taps(model)
    onnx.checker.check_model(model)
    assert kernel_of(model) == expected and cropped == (expected != list(kernel))
    after = run(model, x)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=0, atol=TOLERANCE)


def test_every_small_shape_keeps_its_output():
    """Every stride, padding and kernel over maps of 1-4: same shape, same values within float32 rounding."""
    checked = cropped_any = 0
    for h, k, s, p in itertools.product(range(1, 5), (1, 2, 3, 5), (1, 2, 3), range(0, 3)):
        if (h + 2 * p - k) // s + 1 < 1 or p >= k:
            continue  # no output, or a pad wider than the kernel (the exporters never write one)
        model = conv_model((h, h + 1), (k, k), s, [p, p, p, p], seed=h * 100 + k * 10 + s)
        x = np.random.default_rng(h).standard_normal((2, 3, h, h + 1)).astype(np.float32)
        before = run(model, x)
        cropped_any += crop_padding_taps(model)
        after = run(model, x)
        assert after.shape == before.shape, (h, k, s, p)
        np.testing.assert_allclose(after, before, rtol=0, atol=TOLERANCE, err_msg=str((h, k, s, p)))
        checked += 1
    assert checked > 60 and cropped_any > 20, (checked, cropped_any)


def test_resnet18_on_32x32_images_loses_its_last_stages_dead_taps(tmp_path):
    """The card's measurements of resnet18 on 32x32 images: its four last-stage 3x3 Convs see 2x2 and 1x1 maps."""
    import torch

    from configs import load_config
    from ml import runtimes
    from ml.inference import Predictor
    from ml.models import build_model

    cfg = load_config({"model": {"name": "resnet18", "num_classes": 10, "in_channels": 3},
                       "data": {"dataset": "fake", "image_size": 32}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3).eval()
    predictor = Predictor(model, classes=[str(i) for i in range(10)], image_size=32, in_channels=3,
                          mean=[0.5] * 3, std=[0.25] * 3)
    runtime = runtimes.OnnxRuntime(runtimes.export_onnx(predictor, tmp_path / runtimes.ONNX_FILE))
    assert runtime.cropped_convs == 4
    inputs = runtimes.reference_inputs(32, 3)
    check = runtimes.agreement(runtime.probabilities(inputs), runtimes.EagerRuntime(predictor).probabilities(inputs))
    assert check["top1_identical"] and check["max_abs_diff"] <= runtimes.TOLERANCE, check
