"""DDP on CPU with 2 gloo ranks: the same run as one process, no_sync, agreed stop and non-finite
guard, a killed rank, resume at another world size, the sharded sampler, the spawn start method."""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import signal
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from configs.schema import ModelConfig
from ml import distributed, launch
from ml.checkpoint import load_checkpoint
from ml.data import EpochSampler
from ml.evaluate import evaluate_checkpoint
from ml.inference import Predictor
from ml.models import build_model
from ml.step import Accumulator, train_step
from ml.train import train, train_rank
from tests.unit.conftest import read_metrics, tiny_config

# 200 digits -> 160 training images: 5 full batches of 32, so 2 ranks x 16 see exactly the 1-process batches.
EVEN = ("model.name=mlp", "data.subset=200")


def two_ranks(cfg):
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, processes=2))


def test_two_ranks_match_one_process_at_the_same_global_batch(tmp_path):
    """mlp (no BatchNorm), accumulation 2, clipping: 2 ranks x 16 vs 1 x 32 differ only by float
    summation order. Stated tolerance: weights within 1e-4, losses and grad norms within 1e-5
    (relative), validation accuracy equal."""
    cfg = tiny_config(*EVEN, "training.grad_accum_steps=2", "training.grad_clip=0.5")
    one = train(cfg, tmp_path / "one", console=False)
    two = train(two_ranks(cfg), tmp_path / "two", console=False)
    assert two.status == "completed" and two.world_size == 2 and two.step == one.step == 2 * 3
    rows1, rows2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(r["type"], r["step"]) for r in rows1] == [(r["type"], r["step"]) for r in rows2]
    for a, b in zip(rows1, rows2):
        for key in ("train_loss", "grad_norm", "val_loss", "train_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
        assert a.get("val_accuracy") == b.get("val_accuracy")
    w1 = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    # only rank 0 wrote: one log, one metrics file, one TensorBoard event file
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert "2 ranks (gloo): 16 of each batch of 32 per rank" in (tmp_path / "two" / "train.log").read_text()


def _count_no_sync(rank, cfg, out):
    """Trains with DDP.no_sync counted; returns rank 0's result and every rank's count."""
    count = [0]
    original = DistributedDataParallel.no_sync

    def counting(self):
        count[0] += 1
        return original(self)

    DistributedDataParallel.no_sync = counting  # this rank's copy of the class only
    result = train_rank(rank, cfg, out)
    per_rank = [0.0] * rank.world_size
    per_rank[rank.index] = count[0]
    return result, rank.total(per_rank)


def test_no_sync_on_the_inner_micro_batches_of_each_group(tmp_path):
    # 5 micro-batches an epoch, accumulation 3: groups [0 1 2] [3 4], inner ones 0, 1, 3
    cfg = tiny_config(*EVEN, "training.grad_accum_steps=3")
    result, counts = launch.launch(_count_no_sync, 2, (cfg, str(tmp_path)))
    assert result.step == 2 * 2
    assert counts == [2 * 3, 2 * 3]


def _nonfinite_on_rank_1(rank):
    """Rank 1's loss is +inf while its gradients stay finite: only the shared decision stops rank 0."""
    torch.manual_seed(0)
    model = rank.wrap(build_model(ModelConfig(name="mlp"), 10, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    opt.step = lambda *a, **k: steps.append(1)
    g = torch.Generator().manual_seed(rank.index)
    x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    ce = nn.CrossEntropyLoss()
    loss_fn = (lambda out, t: ce(out, t) + float("inf")) if rank.index == 1 else ce
    try:
        train_step(model, x, y, loss_fn, opt, torch.amp.GradScaler("cpu", enabled=False), Accumulator(),
                   n_micro=1, boundary=True, sync=rank.sync_step)
        message = None
    except ValueError as exc:
        message = str(exc)
    raised = rank.total([float(message is not None)])[0]   # a collective after the guard: nobody hangs
    return raised, message, len(steps)


def test_nonfinite_guard_is_agreed_by_every_rank():
    raised, message, steps = launch.launch(_nonfinite_on_rank_1, 2)
    assert raised == 2 and steps == 0
    # rank 0's own loss and every gradient were finite: it stopped on the shared loss alone
    assert "non-finite loss at step 1" in message and "non-finite gradient: None" in message


def test_a_value_error_in_a_rank_is_the_runs_error(tmp_path):
    with pytest.raises(ValueError, match="num_classes is 3 but the dataset has 10"):
        train(tiny_config(*EVEN, "model.num_classes=3", "training.processes=2"), tmp_path, console=False)


def test_cancel_stops_every_rank_and_a_two_rank_checkpoint_resumes_at_one(tmp_path):
    cfg = tiny_config(*EVEN, "training.epochs=3")
    # asked before the first step: rank 0 sees it at the first step boundary and every rank stops there
    stopped = train(two_ranks(cfg), tmp_path / "run", console=False, should_stop=lambda: True)
    assert stopped.status == "stopped" and stopped.step == 1
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and last["step"] == 1 and last["batch_in_epoch"] == 1
    assert last["partial"]["seen"] == 32                                   # both ranks' images
    assert not multiprocessing.active_children()
    resumed = train(cfg, tmp_path / "run", console=False)                  # one process now
    assert resumed.status == "completed" and resumed.world_size == 1 and resumed.step == 3 * 5
    assert f"(step {stopped.step})" in (tmp_path / "run" / "train.log").read_text()
    full = train(cfg, tmp_path / "full", console=False)
    assert resumed.latest["train_loss"] == pytest.approx(full.latest["train_loss"], rel=1e-4)
    assert resumed.best["val_accuracy"] == pytest.approx(full.best["val_accuracy"], abs=1 / 40)  # <= 1 image
    # what the registry serves: best.pt is a plain checkpoint, evaluated and loaded as any other
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert evaluate_checkpoint(best)["accuracy"] == load_checkpoint(best)["best"]["val_accuracy"]
    x = torch.zeros(2, 1, 16, 16)
    assert Predictor.from_checkpoint(best).model(x).shape == (2, 10)


def _train_and_die(rank, cfg, out, at_call):
    """Rank 1 SIGKILLs itself at its ``at_call``-th micro-batch."""
    if rank.index == 1:
        import ml.train

        calls, original = itertools.count(1), ml.train.train_step

        def dying(*args, **kwargs):
            if next(calls) == at_call:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        ml.train.train_step = dying
    return train_rank(rank, cfg, out)


def test_a_killed_rank_ends_every_rank_and_the_run_resumes(tmp_path):
    cfg = tiny_config(*EVEN, "training.epochs=2", "model.name=small_cnn")
    t0 = time.monotonic()
    with pytest.raises(launch.RankFailed, match="rank 1 of 2 was killed by SIGKILL"):
        launch.launch(_train_and_die, 2, (cfg, str(tmp_path), 7))   # in epoch 2
    assert time.monotonic() - t0 < 60 and not multiprocessing.active_children()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    done = train(two_ranks(cfg), tmp_path, console=False)
    assert done.status == "completed" and done.resumed_from_epoch == 1 and done.step == 2 * 5


def test_amp_grad_checkpointing_and_clipping_under_ddp(tmp_path):
    cfg = tiny_config("data.subset=200", "training.amp=fp16", "training.grad_checkpointing=true",
                      "training.grad_clip=1.0", "training.grad_accum_steps=2", "training.epochs=1",
                      "training.processes=2")
    result = train(cfg, tmp_path, console=False)
    assert result.status == "completed" and result.world_size == 2
    steps = [r for r in read_metrics(tmp_path) if r["type"] == "step"]
    assert steps and all(r["grad_norm"] > 0 for r in steps)
    assert all(not k.startswith("module.") for k in steps[0]["layer_grad_norms"])   # the unwrapped names
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert not any(k.startswith("module.") for k in state["model"]) and state["scaler"]["scale"] > 0


@pytest.mark.parametrize("world, start", [(1, 0), (2, 0), (2, 8), (3, 6), (2, 19)])
def test_sharded_sampler_splits_each_global_batch_of_the_one_process_order(world, start):
    n, batch = 20, 6
    one = EpochSampler(n, seed=3)
    one.set_epoch(2, start=start)
    order = list(one)
    shards = []
    for r in range(world):
        s = distributed.ShardedSampler(n, 3, r, world)
        s.set_epoch(2, start=start)
        shards.append(list(s))
    assert len({len(s) for s in shards}) == 1                          # every rank as many samples
    per = batch // world
    for k in range(-(-len(order) // batch)):
        together = {item for s in shards for item in s[k * per:(k + 1) * per]}
        assert set(order[k * batch:(k + 1) * batch]) <= together       # padding may repeat a few


def test_resolve_processes():
    assert launch.resolve_processes(1, "auto", 32) == (1, None)
    assert launch.resolve_processes(2, "cpu", 32) == (2, "cpu")
    if not torch.cuda.device_count():
        assert launch.resolve_processes("auto", "auto", 32) == (1, None)
    with pytest.raises(ValueError, match="multiple of training.processes 3"):
        launch.resolve_processes(3, "cpu", 32)
    with pytest.raises(ValueError, match="names one device"):
        launch.resolve_processes(2, "cuda:1", 32)


def _sum_of_ranks(rank):
    return rank.total([rank.index + 1.0]), torch.get_num_threads()


def test_forked_ranks_run_one_thread_each(tmp_path):
    torch.set_num_threads(2)        # the launcher ran (or may run) a 2-thread OpenMP team
    try:
        torch.randn(256, 256) @ torch.randn(256, 256)
        total, threads = launch.launch(_sum_of_ranks, 2)
    finally:
        torch.set_num_threads(1)
    assert total == [3.0] and threads == 1


def test_spawned_ranks_as_cuda_uses_them_even_from_a_celery_pool_child():
    from billiard.process import AuthenticationString

    assert launch.start_method("cuda") == "spawn" and launch.start_method("cpu") == "fork"
    me = multiprocessing.current_process()
    key = bytes(me.authkey)
    me._config["authkey"] = AuthenticationString(key)   # what a job process forked from a pool child carries
    try:
        total, threads = launch.launch(_sum_of_ranks, 2, method="spawn")
    finally:
        me.authkey = key
    assert total == [3.0] and threads == launch.rank_threads("spawn", 2)
