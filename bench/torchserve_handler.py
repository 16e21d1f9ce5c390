"""TorchServe handler for bench/serve.py: what Kiln's /predict does, in TorchServe's load -> handle vocabulary.

Per batch TorchServe hands it: decode each request's image, Kiln's eval transform (``ml.inference.Predictor``:
channels, resize, normalise), one batched eager forward pass on one intra-op thread, top-5 per image. The
weights are the checkpoint Kiln serves, loaded with ``torch.load(weights_only=True)``.
"""
import io
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.environ["KILN_ROOT"])
from ml.inference import Predictor  # noqa: E402

TOP_K = 5
_predictor = None


def handle(data, context):
    """TorchServe's entry point: called once with no data to load, then once per batch of requests."""
    global _predictor
    if _predictor is None:
        torch.set_num_threads(int(os.environ.get("KILN_TS_THREADS", "1")))
        model_dir = context.system_properties["model_dir"]
        _predictor = Predictor.from_checkpoint(os.path.join(model_dir, "model.pt"))
    if data is None:
        return None
    arrays = [_predictor.prepare(Image.open(io.BytesIO(row.get("data") or row.get("body"))), i)
              for i, row in enumerate(data)]
    rows = _predictor.postprocess(_predictor.infer(_predictor.batch(arrays)), TOP_K)  # [N,S,S,C] -> N rows
    return [{"predictions": [row]} for row in rows]
