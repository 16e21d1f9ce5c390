"""Evaluate a checkpoint: accuracy, top-k, per-class precision/recall/F1, confusion matrix.

``python -m ml.evaluate CKPT [--data digits|fake|<id>|PATH] [--set data.k=v]`` prints JSON.
With the training dataset (the default) the same validation split is used, so the accuracy equals
the val_accuracy recorded for that checkpoint; a folder PATH is evaluated in full.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from configs.names import is_id
from configs.schema import BUILTIN_DATASETS, DataConfig, ModelConfig, apply_overrides, parse_config
from ml.checkpoint import load_checkpoint
from ml.data import LazyImages, build_data, eval_transform, folder_source, make_loader
from ml.models import build_model


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str],
                           top_k: int = 5) -> dict:
    """Metrics from logits [N,K] and integer targets [N]."""
    from sklearn.metrics import precision_recall_fscore_support

    k = len(classes)
    pred = logits.argmax(1).numpy()
    y = targets.numpy()
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    topk = min(top_k, k)
    hits = (logits.topk(topk, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, targets).item() if len(y) else float("nan")
    return {
        "n": int(len(y)), "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        f"top{topk}_accuracy": hits, "loss": loss,
        "macro_f1": float(np.mean(f)), "classes": classes,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion(y, pred, labels),
    }


def confusion(true, pred, labels) -> list[list[int]]:
    """Confusion matrix over ``labels`` in that order: rows are true labels, columns predicted ones."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(true, pred, labels=labels).tolist()


def _folder_dataset(root: str, ckpt: dict, transform):
    """A labelled folder whose class folders are named after (a subset of) the model's classes."""
    source = folder_source(root, ckpt["classes"])
    return LazyImages(source, np.arange(len(source.labels)), transform)


def evaluate_checkpoint(path: str | Path, data: str | DataConfig | Mapping | None = None, *,
                        overrides: list[str] | tuple[str, ...] = (), dataset_roots: Mapping[str, str] | None = None,
                        batch_size: int | None = None, device: str = "cpu", top_k: int = 5) -> dict:
    """Evaluate ``path`` on its training validation split (data None or the same dataset name),
    a DataConfig/mapping (its validation split), or a folder path in ImageFolder layout (all of it)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    mcfg = ModelConfig(**{k: v for k, v in cfg["model"].items() if k != "weights"})
    norm, size, in_ch = ckpt["normalization"], int(ckpt["image_size"]), int(ckpt["in_channels"])
    training = cfg.get("training") or {}
    seed = int(training.get("seed", 0))
    bs = batch_size or int(training.get("batch_size", 64))  # training's batch size: same numerics
    if isinstance(data, str) and data not in BUILTIN_DATASETS and not is_id(data):
        dataset = _folder_dataset(data, ckpt, eval_transform(size, in_ch, norm["mean"], norm["std"]))
        described = {"root": data}
    else:
        if isinstance(data, DataConfig):
            dcfg = data
        else:
            d = dict(cfg["data"])
            if isinstance(data, Mapping):
                d = dict(data)
            elif isinstance(data, str) and data != d["dataset"]:
                d = {**d, "dataset": data, "root": None}
            d = apply_overrides({"data": d}, [o if o.startswith("data.") else f"data.{o}" for o in overrides])["data"]
            dcfg = parse_config({"data": d}).data
        bundle = build_data(dcfg, seed=seed, in_channels=in_ch, dataset_roots=dataset_roots,
                            normalization=norm, image_size=size)
        if bundle.classes != list(ckpt["classes"]):
            raise ValueError(f"dataset classes {bundle.classes} differ from the model's {ckpt['classes']}")
        dataset, described = bundle.val, {"dataset": dcfg.dataset, "split": "val", "val_split": dcfg.val_split}
    dev = torch.device(device)
    model = build_model(mcfg, len(ckpt["classes"]), in_ch, image_size=size)
    model.load_state_dict(ckpt["model"])
    model = model.to(dev).eval()
    if mcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    logits, targets = [], []
    with torch.inference_mode():
        for x, y in make_loader(dataset, bs, device=dev):
            x = x.to(dev)
            if mcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits.append(model(x).float().cpu())
            targets.append(torch.as_tensor(y))
    out = classification_metrics(torch.cat(logits), torch.cat(targets), list(ckpt["classes"]), top_k)
    return {"checkpoint": str(path), "epoch": ckpt.get("epoch"), "data": described, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ml.evaluate", description="Evaluate a Kiln checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="digits | fake | <dataset id> | PATH (default: training data)")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, overrides=args.set,
                                     batch_size=args.batch_size, device=args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
