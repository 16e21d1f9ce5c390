"""Checkpoints written off the training thread: a consistent snapshot, a bounded hand-off, errors surfaced
on the training thread, and a crash that never leaves half a file."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import ml.checkpoint as ckpt_mod
from ml.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint, snapshot
from ml.train import train
from tests.unit.conftest import ROOT, tiny_config


def test_snapshot_is_unaffected_by_later_steps():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    snap = snapshot({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1})
    before = {k: v.clone() for k, v in snap["model"].items()}
    moment = snap["optimizer"]["state"][0]["exp_avg"].clone()
    for _ in range(3):                      # the training thread goes on mutating params and Adam's moments
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    assert not torch.equal(model.weight, before["weight"])
    assert all(torch.equal(snap["model"][k], before[k]) for k in before)
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], moment)
    assert snap["model"]["weight"].data_ptr() != model.weight.data_ptr()


def test_resume_from_an_async_written_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """epoch-1.pt is written while epoch 2 trains; resuming from it reproduces the full run exactly."""
    cfg = tiny_config("training.deterministic=true", "training.epochs=3", "training.keep_every=1",
                      "model.dropout=0.2")
    full = train(cfg, tmp_path / "full", console=False)
    kept = sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("epoch-*.pt"))
    assert kept == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp-*"))       # every write finished
    e1 = load_checkpoint(tmp_path / "full" / "checkpoints" / "epoch-1.pt")
    assert e1["epoch"] == 1 and "optimizer" in e1 and e1["step"] == full.step // 3
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    (resumed_dir / "last.pt").write_bytes((tmp_path / "full" / "checkpoints" / "epoch-1.pt").read_bytes())
    resumed = train(cfg, tmp_path / "resumed", console=False)
    assert resumed.resumed_from_epoch == 1 and resumed.step == full.step and resumed.best == full.best
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed_dir / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_keep_every_keeps_only_every_nth_epoch(tmp_path):
    train(tiny_config("training.epochs=4", "training.keep_every=2", "training.checkpoint_every=3",
                      "data.subset=64"), tmp_path, console=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "epoch-2.pt", "epoch-4.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "epoch-2.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 4


def test_a_failed_write_surfaces_on_the_training_thread(tmp_path, monkeypatch):
    writer = CheckpointWriter()
    calls = []

    def failing_save(obj, f):
        calls.append(threading.current_thread().name)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    writer.submit([(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}})])   # queued: returns at once
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    assert calls == ["kiln-checkpoint-writer"]                                # it ran on the writer thread
    writer.submit([(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}})])
    deadline = time.monotonic() + 30
    while not writer.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="disk full"):                            # ... or at the next save
        writer.submit([(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}})])
    writer.close()
    assert not list(tmp_path.iterdir())


def test_a_failed_write_fails_the_run(tmp_path, monkeypatch):
    real = ckpt_mod.save_checkpoint

    def save(path, state):
        if state["epoch"] >= 2:
            raise OSError("disk full")
        return real(path, state)

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config("training.epochs=3", "data.subset=64"), tmp_path, console=False)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1   # the last good one stays


def test_at_most_one_write_waits_behind_the_one_being_written(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    real = torch.save

    def slow_save(obj, f):
        started.set()
        assert gate.wait(30)
        real(obj, f)

    monkeypatch.setattr(ckpt_mod.torch, "save", slow_save)
    writer = CheckpointWriter()
    writer.submit([(tmp_path / "a.pt", {"model": {}, "epoch": 1})])
    assert started.wait(10)                                      # a.pt is being written
    writer.submit([(tmp_path / "b.pt", {"model": {}, "epoch": 2})])   # b.pt waits: submit returns
    third = threading.Thread(target=writer.submit, args=([(tmp_path / "c.pt", {"model": {}, "epoch": 3})],))
    third.start()
    third.join(0.5)
    assert third.is_alive()                                      # a third save waits for the writer
    gate.set()
    third.join(10)
    assert not third.is_alive()
    writer.close()
    assert [load_checkpoint(tmp_path / f"{n}.pt")["epoch"] for n in "abc"] == [1, 2, 3]


CRASH = """
import os, sys, threading, torch
import ml.checkpoint as c
path = sys.argv[1]
real, writing = torch.save, threading.Event()

def torn(obj, f):          # half the new checkpoint is on disk (in the temp file) when the process dies
    f.write(b"x" * 4096)
    f.flush()
    writing.set()
    threading.Event().wait()

c.torch.save = torn
writer = c.CheckpointWriter()
state = c.snapshot({"model": {"w": torch.ones(3)}, "epoch": 2})
writer.submit([(path, state)])
writing.wait(30)
os._exit(9)
"""


def test_a_crash_between_snapshot_and_write_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 1})
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH), str(path)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("last.pt", "last.json")]
    assert all(n.startswith(".tmp-") for n in leftovers) and len(leftovers) == 1   # the torn temp file only
