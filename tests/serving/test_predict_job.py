"""Batch inference (kind "predict") over a labelled image folder and over digits, with resume and cancel."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from worker.predict_job import run_predict


def image_folder(root, per_class: int = 3):
    from sklearn.datasets import load_digits

    d = load_digits()
    for digit in (0, 1, 7):
        folder = root / str(digit)
        folder.mkdir(parents=True)
        idx = np.flatnonzero(d.target == digit)[:per_class]
        for i in idx:
            Image.fromarray(np.rint(d.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i}.png")
    return root


def test_predictions_and_summary_over_a_labelled_folder(registered, tmp_path):
    root = image_folder(tmp_path / "data")
    reports = []
    out = run_predict({"model": "digits@production", "data": {"dataset": "imagefolder", "root": str(root)},
                       "batch_size": 4, "top_k": 2}, resolve_model=registered.resolve_model,
                      work_dir=tmp_path / "job", report=reports.append)
    lines = [json.loads(x) for x in (tmp_path / "job/predictions.jsonl").read_text().splitlines()]
    assert out["status"] == "completed" and len(lines) == 9 == out["count"]
    assert {"path", "label", "index", "top_k"} <= set(lines[0]) and len(lines[0]["top_k"]) == 2
    assert [x["path"] for x in lines] == sorted(x["path"] for x in lines)
    summary = json.loads((tmp_path / "job/summary.json").read_text())
    correct = sum(x["label"] == x["true_label"] for x in lines)
    assert summary["accuracy"] == correct / 9 and sum(map(sum, summary["confusion_matrix"])) == 9
    assert [r["step"] for r in reports] == [4, 8, 9, 9] and reports[-1]["percent"] == 100.0


def test_cancel_then_resume_skips_written_lines(registered, tmp_path):
    polls = iter([False, True])
    cfg = {"model": "digits:1", "data": {"dataset": "digits", "subset": 10}, "batch_size": 4}
    first = run_predict(cfg, resolve_model=registered.resolve_model, work_dir=tmp_path,
                        should_stop=lambda: next(polls))
    assert first["status"] == "stopped" and first["count"] == 4
    with (tmp_path / "predictions.jsonl").open("a") as f:
        f.write('{"path": "torn')  # a crash mid-line is cut off on resume
    second = run_predict(cfg, resolve_model=registered.resolve_model, work_dir=tmp_path)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert second["status"] == "completed" and len(lines) == 10
    assert [json.loads(x)["path"] for x in lines] == [f"digits/{i:04d}" for i in range(10)]
