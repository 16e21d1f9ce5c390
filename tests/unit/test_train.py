"""The loop end to end on tiny digits runs: outputs, progress, stop/resume equivalence, guards."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ml.checkpoint import load_checkpoint
from ml.evaluate import evaluate_checkpoint
from ml.train import train
from tests.unit.conftest import ROOT, read_metrics, tiny_config

TIMING = {"time_s", "images_per_s"}


def test_outputs_progress_and_best_checkpoint(tmp_path):
    events = []
    result = train(tiny_config("training.grad_accum_steps=2", "model.dropout=0.1"), tmp_path,
                   report=events.append, console=False)
    assert result.status == "completed" and result.epochs_completed == 2
    assert result.step == 2 * 4                                 # 7 micro-batches / accum 2 -> 4 steps
    rows = read_metrics(tmp_path)
    epochs = [r for r in rows if r["type"] == "epoch"]
    steps = [r for r in rows if r["type"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    assert steps[0]["layer_grad_norms"] and steps[0]["grad_norm"] > 0
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    assert {e["event"] for e in events} == {"start", "step", "epoch", "end"}
    assert events[-1]["percent"] == 100.0 and events[-1]["total_steps"] == 8
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert ckpt["config"]["model"]["num_classes"] == 10 and ckpt["config"]["model"]["in_channels"] == 1
    assert ckpt["best"]["val_accuracy"] == max(r["val_accuracy"] for r in epochs) == result.best["val_accuracy"]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["epoch"] == ckpt["epoch"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # evaluation on the same validation split reproduces the recorded accuracy. Its batches are
    # composed differently, so a near-tie may flip: tolerance of one image of the split.
    ev = evaluate_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert ev["accuracy"] == pytest.approx(ckpt["best"]["val_accuracy"], abs=1.0 / ev["n"] + 1e-9)
    assert len(ev["confusion_matrix"]) == 10 and sum(map(sum, ev["confusion_matrix"])) == ev["n"]


@pytest.mark.parametrize("stop_after", [3, 9])    # mid epoch 1, and mid epoch 2
def test_stop_and_resume_equals_uninterrupted_run(tmp_path, stop_after):
    cfg = tiny_config("training.deterministic=true", "model.dropout=0.2", "training.epochs=3")
    full = train(cfg, tmp_path / "full", console=False)
    polls = iter(range(1000))
    stopped = train(cfg, tmp_path / "split", should_stop=lambda: next(polls) + 1 >= stop_after, console=False)
    assert stopped.status == "stopped" and stopped.step == stop_after
    last = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert last["step"] == stop_after and last["batch_in_epoch"] > 0
    resumed = train(cfg, tmp_path / "split", console=False)
    assert resumed.status == "completed" and resumed.resumed_from_epoch == last["epoch"]
    assert resumed.step == full.step and resumed.best == full.best
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(tmp_path / "full")]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(tmp_path / "split")] == strip
    log = (tmp_path / "split" / "train.log").read_text()
    assert f"resuming from checkpoint at epoch {last['epoch']} (step {stop_after})" in log


def test_nonfinite_weights_raise_naming_the_parameter(tmp_path):
    from configs.schema import ModelConfig
    from ml.models import build_model

    model = build_model(ModelConfig(name="mlp"), 10, 1)
    state = model.state_dict()
    state["net.1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"net\.1\.weight"):
        train(tiny_config("model.name=mlp", f"model.weights={tmp_path / 'nan.pt'}"), tmp_path / "run", console=False)


def test_debug_logs_activation_ranges_and_early_stopping(tmp_path):
    result = train(tiny_config("training.debug=true", "training.epochs=6", "training.lr=1.0e-9",
                               "training.early_stopping_patience=1", "data.subset=64"), tmp_path, console=False)
    log = (tmp_path / "train.log").read_text()
    assert "activation features.0.0.0 range" in log
    assert result.status == "early_stopped" and result.epochs_completed < 6


def test_mismatched_num_classes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="num_classes is 3 but the dataset has 10"):
        train(tiny_config("model.num_classes=3"), tmp_path, console=False)


def test_cli_writes_every_output_and_evaluate_agrees(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ml.train", "configs/smoke.yaml", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["status"] == "completed"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/last.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "num_classes: 10" in (out / "config.yaml").read_text()
    ev = subprocess.run([sys.executable, "-m", "ml.evaluate", str(out / "checkpoints/best.pt")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    best = max(r["val_accuracy"] for r in read_metrics(out) if r["type"] == "epoch")
    report = json.loads(ev.stdout)  # other batch composition: within one image of the split
    assert report["accuracy"] == pytest.approx(best, abs=1.0 / report["n"] + 1e-9)
    bad = subprocess.run([sys.executable, "-m", "ml.train", "configs/smoke.yaml", "--out", str(out),
                          "--set", "training.lr=-1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "training.lr" in bad.stderr
