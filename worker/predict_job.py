"""Batch-inference jobs (kind "predict"): a registered model over a dataset.

Writes jobs/<id>/predictions.jsonl (one line per image: path, label, index, top_k)
and, when the images sit in class folders, jobs/<id>/summary.json (accuracy and
confusion matrix). Resumable: lines already in predictions.jsonl are skipped, so a
job put back in the queue after a dead worker continues where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Sample:
    path: str                 # relative to the dataset root (what predictions.jsonl records)
    label: str | None         # class folder name, None when unlabelled
    load: Callable[[], object]  # -> PIL image (or pixel array)


def list_imagefolder(root: str | Path, subset: int | None = None) -> list[Sample]:
    """Images under ``root``: labelled when every image sits in a class folder directly below it."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist; check data.root or the dataset id")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    labelled = all(len(p.relative_to(root).parts) == 2 for p in files)

    def loader(p: Path):
        # Same as torchvision's ImageFolder loader, so accuracy matches ml.evaluate.
        return lambda: Image.open(p).convert("RGB")

    samples = [Sample(str(p.relative_to(root)), p.parent.name if labelled else None, loader(p)) for p in files]
    return samples[:subset] if subset else samples


def list_digits(subset: int | None = None) -> list[Sample]:
    """scikit-learn's bundled digits as 8x8 grayscale images (values 0..16 scaled to 0..255)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    n = len(images) if not subset else min(subset, len(images))
    return [Sample(f"digits/{i:04d}", str(int(digits.target[i])), (lambda a=images[i]: a)) for i in range(n)]


def list_samples(data: Mapping, dataset_roots: Mapping[str, str] | None = None) -> list[Sample]:
    """The samples a predict config names: an uploaded dataset id, an imagefolder root, or digits."""
    dataset, subset = data.get("dataset", "imagefolder"), data.get("subset")
    if dataset == "digits":
        return list_digits(subset)
    if dataset == "imagefolder":
        return list_imagefolder(data["root"], subset)
    root = (dataset_roots or {}).get(dataset)
    if root is None:
        raise ValueError(f"dataset {dataset} is not available to this worker; upload it with POST /v1/datasets")
    return list_imagefolder(root, subset)


def _done_lines(path: Path) -> int:
    """Complete lines already written (a torn last line from a crash is cut off)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        path.write_bytes(keep)
    return keep.count(b"\n")


def summarize(predictions_path: Path, classes: list[str], model: dict) -> dict | None:
    """Accuracy and confusion matrix (rows: true class, columns: predicted) for labelled datasets."""
    rows = [json.loads(line) for line in predictions_path.read_text().splitlines() if line.strip()]
    if not rows or any(r.get("true_label") is None for r in rows):
        return None
    labels = list(classes) + sorted({r["true_label"] for r in rows} - set(classes))
    index = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for r in rows:
        matrix[index[r["true_label"]]][index[r["label"]]] += 1
    correct = sum(r["label"] == r["true_label"] for r in rows)
    return {"model": model, "count": len(rows), "correct": correct, "accuracy": correct / len(rows),
            "labels": labels, "confusion_matrix": matrix}


def run_predict(config: Mapping, *, resolve_model: Callable[[str], dict], work_dir: str | Path,
                report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                dataset_roots: Mapping[str, str] | None = None) -> dict:
    """Run one predict job into ``work_dir`` (predictions.jsonl, summary.json); resumes from what is there.

    ``config`` is the validated PredictConfig as a dict. Returns {"status": "completed"|"stopped",
    "count", "total", "model", "summary"}. Raises ValueError for bad data (recorded as the job error).
    """
    import torch

    from ml.inference import Predictor

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolve_model(config["model"])
    model = {"name": resolved["name"], "version": resolved["version"]}
    device = config.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor.from_checkpoint(resolved["path"], device=device)
    samples = list_samples(config.get("data") or {}, dataset_roots)
    out_path = work_dir / "predictions.jsonl"
    done = _done_lines(out_path)
    total, batch_size, top_k = len(samples), int(config.get("batch_size", 256)), int(config.get("top_k", 5))
    if done:
        log.info("resuming batch inference at image %d of %d", done, total)
    started = time.monotonic()
    with out_path.open("a") as out:
        for start in range(done, total, batch_size):
            if should_stop is not None and should_stop():
                return {"status": "stopped", "count": start, "total": total, "model": model, "summary": None}
            chunk = samples[start:start + batch_size]
            results = predictor.predict_batch([s.load() for s in chunk], top_k=top_k, batch_size=batch_size)
            for sample, res in zip(chunk, results):
                line = {"path": sample.path, **res}
                if sample.label is not None:
                    line["true_label"] = sample.label
                out.write(json.dumps(line) + "\n")
            out.flush()
            count = start + len(chunk)
            if report is not None:
                elapsed = time.monotonic() - started
                rate = (count - done) / elapsed if elapsed > 0 else None
                report({"event": "step", "step": count, "total_steps": total, "percent": 100.0 * count / total,
                        "eta_s": (total - count) / rate if rate else None, "metrics": {"images": count}})
    summary = summarize(out_path, predictor.classes, model)
    if summary is not None:
        (work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if report is not None:
        metrics = {"images": total, **({"accuracy": summary["accuracy"]} if summary else {})}
        report({"event": "end", "step": total, "total_steps": total, "percent": 100.0, "eta_s": 0.0,
                "metrics": metrics})
    return {"status": "completed", "count": total, "total": total, "model": model, "summary": summary}
