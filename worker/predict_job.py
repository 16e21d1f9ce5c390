"""Batch-inference jobs (kind "predict"): the model reference is resolved through the registry here,
then ``ml.batch_predict.predict_dataset`` lists the images and writes the predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping


def run_predict(config: Mapping, *, resolve_model: Callable[[str], dict], work_dir: str | Path,
                report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                dataset_roots: Mapping[str, str] | None = None) -> dict:
    """Run one predict job into ``work_dir``; resumes from what is there.

    ``config`` is the validated PredictConfig as a dict. Returns {"status": "completed"|"stopped",
    "count", "total", "model", "summary"}. Raises ValueError for bad data (recorded as the job error).
    """
    from ml.batch_predict import predict_dataset

    resolved = resolve_model(config["model"])
    return predict_dataset(resolved["path"], config, work_dir,
                           model={"name": resolved["name"], "version": resolved["version"]},
                           report=report, should_stop=should_stop, dataset_roots=dataset_roots)
