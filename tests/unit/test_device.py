"""CUDA paths: AMP and pinned memory. Skipped (with the reason) on machines without CUDA."""
from __future__ import annotations

import pytest
import torch

from ml.train import train
from tests.unit.conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_cuda(tmp_path, amp):
    result = train(tiny_config(f"training.amp={amp}", "training.device=cuda", "model.channels_last=true"),
                   tmp_path, console=False)
    assert result.status == "completed" and result.latest["train_loss"] < 5


@cuda
def test_pinned_memory_loader_on_cuda():
    from ml.data import build_data, make_loader

    b = build_data(tiny_config().data, seed=0)
    loader = make_loader(b.train, 16, device=torch.device("cuda"), seed=0)
    x, _ = next(iter(loader))
    assert loader.pin_memory and x.is_pinned()


def test_amp_resolution_on_cpu():
    from ml.runtime import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("off", cpu) is None and resolve_amp("fp16", cpu) is torch.float16
