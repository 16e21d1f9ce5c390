"""Unit-test helpers: tiny configs (image_size 16, digits subsets) and one torch thread per process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from configs import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)  # the machine is shared: one core per test process


def tiny_config(*overrides: str):
    """A seconds-long digits run; ``overrides`` are dotted key=value strings."""
    base = {"model": {"name": "small_cnn", "channels_last": False},
            "data": {"dataset": "digits", "image_size": 16, "subset": 256, "num_workers": 0},
            "training": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "log_every_steps": 2, "seed": 0}}
    return load_config(base, list(overrides))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
