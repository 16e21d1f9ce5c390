"""Inference for a trained classifier, shaped like a serving handler.

``Predictor`` = load -> preprocess -> infer -> postprocess, each a plain method:
the web batcher and batch-inference jobs compose them (validate inputs one by one
in the request thread, then run one forward pass for many). Preprocessing is the
exact transform training used for evaluation (``ml.data.eval_transform``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from configs.schema import ModelConfig
from ml import images



class Predictor:
    """A loaded model plus everything needed to turn raw images into labelled probabilities."""

    def __init__(self, model: torch.nn.Module, *, classes: Sequence[str], image_size: int,
                 in_channels: int, mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu", channels_last: bool = False):
        from ml.data import eval_transform  # one eval transform, shared with training

        self.device = torch.device(device)
        self.classes = [str(c) for c in classes]
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        # channels_last speeds up convolutions on GPU; on CPU it is neutral-to-helpful for resnets.
        self.channels_last = bool(channels_last)
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.transform = eval_transform(self.image_size, self.in_channels, self.mean, self.std)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "Predictor":
        """Load a training checkpoint or a registered model.pt (weights_only); .safetensors reads card.json."""
        path = Path(path)
        if path.suffix == ".safetensors":
            return cls.from_safetensors(path, device=device)
        from ml.checkpoint import load_checkpoint

        return cls.from_state(load_checkpoint(path, map_location="cpu"), device=device)

    @classmethod
    def from_state(cls, ckpt: dict, device: str | torch.device = "cpu") -> "Predictor":
        """Rebuild the model from a checkpoint dict (config, classes, normalization, model state)."""
        missing = [k for k in ("model", "config", "classes", "normalization") if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint lacks {', '.join(missing)}; expected a Kiln checkpoint or model.pt")
        return cls._build(ckpt["config"], ckpt["classes"], ckpt["normalization"], ckpt["model"],
                          image_size=ckpt.get("image_size"), in_channels=ckpt.get("in_channels"),
                          device=device)

    @classmethod
    def from_safetensors(cls, path: str | Path, card: dict | None = None,
                         device: str | torch.device = "cpu") -> "Predictor":
        """Load weights from model.safetensors; metadata from ``card`` or the card.json beside it."""
        from safetensors.torch import load_file

        path = Path(path)
        if card is None:
            card_path = path.with_name("card.json")
            if not card_path.exists():
                raise ValueError(f"{card_path} not found: a .safetensors model needs its card.json")
            card = json.loads(card_path.read_text())
        return cls._build(card["config"], card["classes"], card["normalization"], load_file(str(path)),
                          image_size=card.get("image_size"), in_channels=card.get("in_channels"),
                          device=device)

    @classmethod
    def _build(cls, config: dict, classes, normalization: dict, state: dict, *, image_size=None,
               in_channels=None, device="cpu") -> "Predictor":
        from ml.models import build_model

        model_cfg = config.get("model", {})
        known = set(ModelConfig.__dataclass_fields__)
        mcfg = ModelConfig(**{k: v for k, v in model_cfg.items() if k in known and k != "weights"})
        in_ch = int(in_channels or model_cfg.get("in_channels"))
        size = int(image_size or config.get("data", {}).get("image_size"))
        model = build_model(mcfg, num_classes=len(classes), in_channels=in_ch)
        model.load_state_dict(state)
        return cls(model, classes=classes, image_size=size, in_channels=in_ch,
                   mean=normalization["mean"], std=normalization["std"], device=device,
                   channels_last=bool(mcfg.channels_last))

    # ------------------------------------------------------------ preprocess
    def prepare(self, x: Any, index: int = 0) -> np.ndarray:
        """One input -> uint8 array [S,S,C], the per-image half of the eval transform.

        Inputs: a PIL image, a pixel array / nested list [H,W] or [H,W,C] (0..255) or a
        tensor [C,H,W] (0..1). Cheap and independent per input: a server runs it in
        request threads and leaves ``batch`` (the tensor half) to one call per forward.
        """
        if isinstance(x, torch.Tensor):
            x = _tensor_to_image(x, f"input {index}")
        return images.prepare(x, index, self.image_size, self.in_channels)

    def batch(self, arrays: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """uint8 arrays from ``prepare`` (or one [N,S,S,C] array) -> normalised Tensor[N,C,S,S]."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.transform.batch(arrays, memory_format=fmt)

    def preprocess_one(self, x: Any, index: int = 0) -> torch.Tensor:
        """One input -> normalised float tensor [C,H,W]; ValueError names the input on bad data."""
        return self.batch([self.prepare(x, index)])[0]

    def preprocess(self, inputs: Sequence[Any]) -> torch.Tensor:
        """A list of inputs -> Tensor[N,C,H,W]."""
        if len(inputs) == 0:
            raise ValueError("no inputs: send at least one image")
        return self.batch([self.prepare(x, i) for i, x in enumerate(inputs)])

    # ----------------------------------------------------------------- infer
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Tensor[N,C,H,W] -> class probabilities Tensor[N,K] (on CPU)."""
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            logits = self.model(batch)
            return torch.softmax(logits.float(), dim=1).cpu()

    # ----------------------------------------------------------- postprocess
    def top_k(self, probs: torch.Tensor, top_k: int = 5) -> tuple[list[list[float]], list[list[int]]]:
        """Probabilities Tensor[N,K] -> the ``top_k`` best (probabilities, class indices) per row, as lists."""
        k = max(1, min(int(top_k), probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        return values.tolist(), indices.tolist()

    def label_rows(self, values: Sequence[Sequence[float]], indices: Sequence[Sequence[int]]) -> list[dict]:
        """Rows of (probabilities, indices) from ``top_k`` -> one {"label", "index", "top_k"} per row."""
        return images.label_rows(self.classes, values, indices)

    def postprocess(self, probs: torch.Tensor, top_k: int = 5) -> list[dict]:
        """Probabilities Tensor[N,K] -> one {"label", "index", "top_k": [...]} per row."""
        return self.label_rows(*self.top_k(probs, top_k))

    # ------------------------------------------------------------- composed
    def predict(self, x: Any, top_k: int = 5) -> dict:
        """Predict one input."""
        return self.postprocess(self.infer(self.preprocess([x])), top_k)[0]

    def predict_batch(self, xs: Iterable[Any], top_k: int = 5, batch_size: int = 64) -> list[dict]:
        """Predict many inputs in chunks of ``batch_size`` (results in input order)."""
        xs = list(xs)
        if not xs:
            return []
        out: list[dict] = []
        for start in range(0, len(xs), batch_size):
            chunk = xs[start:start + batch_size]
            batch = self.batch([self.prepare(x, start + i) for i, x in enumerate(chunk)])
            out.extend(self.postprocess(self.infer(batch), top_k))
        return out

    def describe(self) -> dict:
        return {"classes": self.classes, "image_size": self.image_size, "in_channels": self.in_channels,
                "device": str(self.device)}


# ---------------------------------------------------------------- helpers

def _tensor_to_image(t: torch.Tensor, where: str) -> Image.Image:
    """Tensor [C,H,W] float in 0..1 (C in 1,3,4) -> PIL image."""
    if t.ndim != 3:
        raise ValueError(f"{where}: expected a tensor [C,H,W], got shape {list(t.shape)}")
    if t.shape[0] not in images.MODES:
        raise ValueError(f"{where}: expected 1, 3 or 4 channels first ([C,H,W]), got shape {list(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{where}: tensor dtype {t.dtype} is not a real number type")
    arr = t.detach().to("cpu", torch.float64).numpy()
    images.check_finite(arr, where)
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"{where}: tensor values must be in 0..1, got {arr.min():g}..{arr.max():g}")
    return images.array_to_image(np.transpose(arr * 255.0, (1, 2, 0)), where)

