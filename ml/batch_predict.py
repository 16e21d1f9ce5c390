"""Batch prediction: a checkpoint over a dataset into predictions.jsonl (and summary.json when labelled).

One line per image (path, label, index, top_k, true_label when in class folders); a run
stopped or killed part-way resumes after the lines already written.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from ml import folders
from ml.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Sample:
    path: str                   # relative to the dataset root (what predictions.jsonl records)
    label: str | None           # class folder name, None when unlabelled
    load: Callable[[], object]  # -> PIL image


def folder_samples(root: str | Path) -> list[Sample]:
    """Images under ``root``: labelled when every image sits in a class folder below it."""
    listing = folders.list_images(root)
    labels = listing.labels or [None] * len(listing.files)
    return [Sample(listing.relative(i), labels[i], (lambda p=p: folders.open_rgb(p)))
            for i, p in enumerate(listing.files)]


def digits_samples() -> list[Sample]:
    """scikit-learn's bundled digits, as training sees them (8x8 grayscale, 0..255)."""
    from configs.schema import DataConfig
    from ml.data import load_source

    source = load_source(DataConfig(dataset="digits"))
    return [Sample(f"digits/{i:04d}", source.classes[int(y)], (lambda i=i: source.load(i)))
            for i, y in enumerate(source.labels)]


def list_samples(data: Mapping, dataset_roots: Mapping[str, str] | None = None) -> list[Sample]:
    """The samples a predict config's ``data`` names: an uploaded dataset id, an imagefolder root, or digits."""
    dataset, subset = data.get("dataset", "imagefolder"), data.get("subset")
    if dataset == "digits":
        samples = digits_samples()
    elif dataset == "imagefolder":
        samples = folder_samples(data["root"])
    elif (dataset_roots or {}).get(dataset) is not None:
        samples = folder_samples(dataset_roots[dataset])
    else:
        raise ValueError(f"dataset {dataset} is not available to this worker; upload it with POST /v1/datasets")
    return samples[:subset] if subset else samples


def _done_lines(path: Path) -> int:
    """Complete lines already written (a torn last line from a crash is cut off)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        atomic_write(path, keep)
    return keep.count(b"\n")


def summarize(predictions_path: Path, classes: list[str], model: dict) -> dict | None:
    """Accuracy and confusion matrix (rows: true class, columns: predicted) for labelled datasets."""
    from ml.evaluate import confusion

    rows = [json.loads(line) for line in predictions_path.read_text().splitlines() if line.strip()]
    if not rows or any(r.get("true_label") is None for r in rows):
        return None
    labels = list(classes) + sorted({r["true_label"] for r in rows} - set(classes))
    correct = sum(r["label"] == r["true_label"] for r in rows)
    return {"model": model, "count": len(rows), "correct": correct, "accuracy": correct / len(rows),
            "labels": labels,
            "confusion_matrix": confusion([r["true_label"] for r in rows], [r["label"] for r in rows], labels)}


def predict_dataset(checkpoint: str | Path, config: Mapping, work_dir: str | Path, *, model: dict,
                    report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                    dataset_roots: Mapping[str, str] | None = None) -> dict:
    """Predict every sample ``config["data"]`` names with ``checkpoint`` into ``work_dir``; resumes.

    ``config`` is a validated PredictConfig as a dict; ``model`` ({name, version}) is recorded in
    the summary. Returns {"status": "completed"|"stopped", "count", "total", "model", "summary"}.
    Raises ValueError for bad data.
    """
    from ml.logs import close_log, open_log

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run_log, handlers = open_log(work_dir / "train.log", console=False)
    try:
        return _predict(checkpoint, config, work_dir, model, run_log, report, should_stop, dataset_roots)
    finally:
        close_log(handlers)


def _predict(checkpoint, config: Mapping, work_dir: Path, model: dict, run_log: logging.Logger, report,
             should_stop, dataset_roots) -> dict:
    from ml.inference import Predictor
    from ml.runtime import resolve_device

    device = resolve_device(config.get("device", "auto"))
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    samples = list_samples(config.get("data") or {}, dataset_roots)
    out_path = work_dir / "predictions.jsonl"
    done = _done_lines(out_path)
    total, batch_size, top_k = len(samples), int(config.get("batch_size", 256)), int(config.get("top_k", 5))
    run_log.info("batch inference with %s:%s on %s: %d images, batch size %d, top %d", model.get("name"),
                 model.get("version"), device, total, batch_size, top_k)
    if done:
        run_log.info("resuming batch inference at image %d of %d", done, total)
    started = time.monotonic()
    with out_path.open("a") as out:
        for start in range(done, total, batch_size):
            if should_stop is not None and should_stop():
                run_log.info("stop requested after %d of %d images", start, total)
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
            elapsed = time.monotonic() - started
            rate = (count - done) / elapsed if elapsed > 0 else None
            run_log.info("%d/%d images (%.0f images/s)", count, total, rate or 0.0)
            if report is not None:
                report({"event": "step", "step": count, "total_steps": total, "percent": 100.0 * count / total,
                        "eta_s": (total - count) / rate if rate else None, "metrics": {"images": count}})
    elapsed = time.monotonic() - started
    summary = summarize(out_path, predictor.classes, model)
    if summary is not None:
        atomic_write(work_dir / "summary.json", json.dumps(summary, indent=2).encode())
    metrics = {"images": total, "images_per_s": (total - done) / elapsed if elapsed > 0 else None,
               **({"accuracy": summary["accuracy"]} if summary else {})}
    with (work_dir / "metrics.jsonl").open("a") as f:  # one pass: one row, shown like a training epoch
        f.write(json.dumps({"type": "epoch", "epoch": 1, "step": total, **metrics}) + "\n")
    run_log.info("completed: %d images in %.1fs%s", total, elapsed,
                 f"; accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['count']})" if summary
                 else " (unlabelled: no accuracy)")
    if report is not None:
        report({"event": "end", "step": total, "total_steps": total, "percent": 100.0, "eta_s": 0.0,
                "metrics": metrics})
    return {"status": "completed", "count": total, "total": total, "model": model, "summary": summary}
