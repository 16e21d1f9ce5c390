"""The training loop: plain functions ``train`` -> ``train_one_epoch`` / ``evaluate``.

Used by the CLI (``python -m ml.train CONFIG.yaml --set k=v --out DIR``) and by the Celery worker,
which passes ``report`` (progress) and ``should_stop`` (cancellation) callables. With
``training.processes`` > 1 the same loop runs in every rank of a DistributedDataParallel group
(ml.launch, ml.distributed): ``training.batch_size`` stays the global batch, and rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from configs.schema import TrainConfig, dump_yaml
from ml import distributed, environment, launch, runtime
from ml.checkpoint import load_checkpoint, unwrap
from ml.data import EpochSampler, batches_per_epoch, build_data, make_loader, resolve_num_workers
from ml.logs import ActivationMonitor, GradAlerts, MetricsLog, NoMetrics, StepProfiler, close_log, open_log
from ml.models import build_model
from ml.optim import build_optimizer, build_scheduler
from ml.run import Run, TrainResult, close_writer, restore, save
from ml.step import Accumulator, train_step

def evaluate(model: nn.Module, loader, device: torch.device, *, channels_last: bool = False,
             total: Callable[[list[float]], list[float]] | None = None) -> dict:
    """Mean cross-entropy and accuracy over ``loader`` in eval mode, fp32 (matches ml.evaluate).

    ``total`` sums [loss_sum, correct, n] over the ranks when each rank evaluates a shard.
    """
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = _to_device(x, y, device, channels_last)
            logits = model(x).float()                                     # [N, K]
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    if total is not None:
        loss_sum, correct, n = total([loss_sum, correct, n])
    return {"val_loss": loss_sum / max(1, n), "val_accuracy": int(correct) / max(1, n)}


def _to_device(x, y, device, channels_last):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(run: Run, loader, epoch: int, *, start_batch: int = 0) -> bool:
    """One pass over ``loader`` (starting at micro-batch ``start_batch``); False if stopped early."""
    t, model, accum = run.cfg.training, run.model, run.cfg.training.grad_accum_steps
    n_micro = batches_per_epoch(len(run.data.train), t.batch_size)   # the same count on every rank
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    sums = run.partial or {"loss_sum": 0.0, "steps": 0, "correct": 0, "seen": 0}
    sums.setdefault("grad_alerts", 0)
    acc, channels_last = Accumulator(), run.cfg.model.channels_last
    sync = run.ranks.sync_step if run.ranks else None
    model.train()
    for i, (x, y) in enumerate(loader, start=start_batch):
        x, y = _to_device(x, y, run.device, channels_last)
        group_start = i - i % accum
        n_in_group = min(accum, n_micro - group_start)    # last group of an epoch may be short
        boundary = i == group_start + n_in_group - 1
        log_now = boundary and (run.step + 1) % t.log_every_steps == 0
        layer_norms = log_now or (boundary and run.alerts is not None)
        with distributed.no_sync(model, inner=not boundary):
            r = train_step(model, x, y, loss_fn, run.optimizer, run.scaler, acc, n_micro=n_in_group,
                           boundary=boundary, amp_dtype=run.amp_dtype, grad_clip=t.grad_clip,
                           want_layer_norms=layer_norms, step=run.step, sync=sync)
        sums["correct"] += r.correct
        sums["seen"] += len(y)
        if not boundary:
            continue
        run.step += 1
        if run.scheduler is not None and not r.skipped:
            run.scheduler.step()
        sums["loss_sum"] += r.loss
        sums["steps"] += 1
        if run.alerts is not None and not r.skipped:   # an fp16 overflow is the scaler's business
            sums["grad_alerts"] += run.alerts.check(r.layer_norms, run.log, epoch, run.step)
        if run.profiler is not None:
            run.profiler.step()
        run.latest.update(train_loss=r.loss, lr=run.optimizer.param_groups[0]["lr"], grad_norm=r.grad_norm)
        if log_now:
            row = {"type": "step", "epoch": epoch, "step": run.step, "train_loss": r.loss,
                   "lr": run.latest["lr"], "grad_norm": r.grad_norm, "layer_grad_norms": r.layer_norms}
            run.metrics.write(row, run.step, "train")
            run.log.info("epoch %d step %d/%d loss %.4f lr %.3g grad_norm %.3g", epoch, run.step,
                         run.total_steps, r.loss, run.latest["lr"], r.grad_norm)
            if run.monitor:
                run.monitor.log(run.log, run.step)
            run.progress("step", epoch)
        if run.should_stop is not None and run.should_stop():   # several ranks: agreed in the step's all-reduce
            run.partial = run.totals(sums)
            save(run, "last", epoch - 1, batch_in_epoch=i + 1)
            run.log.info("stop requested: checkpoint at epoch %d batch %d (step %d)", epoch, i + 1, run.step)
            return False
    run.partial = sums
    return True


def _resolve(cfg: TrainConfig, data) -> TrainConfig:
    k = len(data.classes)
    if cfg.model.num_classes != "auto" and cfg.model.num_classes != k:
        raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the dataset has {k} classes "
                         f"({', '.join(data.classes[:10])}...); set num_classes: auto")
    model = dataclasses.replace(cfg.model, num_classes=k, in_channels=data.in_channels)
    return dataclasses.replace(cfg, model=model)


def train(cfg: TrainConfig, out_dir, *, report=None, should_stop=None, resume: bool = True,
          dataset_roots: Mapping[str, str] | None = None, console: bool = True) -> TrainResult:
    """Train ``cfg`` writing config.yaml, train.log, metrics.jsonl, tensorboard/ and checkpoints/ to ``out_dir``.

    training.processes > 1 runs that many DDP ranks on this host, started from this process;
    ``report`` and ``should_stop`` are called here, never in a rank.
    """
    t = cfg.training
    world, device_type = launch.resolve_processes(t.processes, t.device, t.batch_size)
    if world > 1:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return launch.launch(train_rank, world, (cfg, str(out_dir), resume, dataset_roots, console),
                             device_type=device_type, report=report, should_stop=should_stop)
    return _train(cfg, Path(out_dir), None, report, should_stop, resume, dataset_roots, console)


def train_rank(rank, cfg: TrainConfig, out_dir: str, resume: bool = True,
               dataset_roots: Mapping[str, str] | None = None, console: bool = False) -> TrainResult:
    """The run inside one rank (ml.launch.launch calls it in each); rank 0 reports and writes."""
    return _train(cfg, Path(out_dir), rank, rank.report if rank.main else None, lambda: rank.stopped,
                  resume, dataset_roots, console and rank.main)


def _train(cfg: TrainConfig, out: Path, rank, report, should_stop, resume: bool,
           dataset_roots: Mapping[str, str] | None, console: bool) -> TrainResult:
    main, world = rank is None or rank.main, 1 if rank is None else rank.world_size
    if main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        log, handlers = open_log(out / "train.log", console)
    else:  # the other ranks write nothing; their warnings still reach stderr
        log, handlers = logging.getLogger("kiln.ml.rank"), []
        log.setLevel(logging.WARNING)
    t = cfg.training
    device = runtime.resolve_device(t.device) if rank is None else rank.device
    was_deterministic = runtime.set_determinism(t.deterministic, device)
    run = None
    try:
        runtime.seed_everything(t.seed)  # the same on every rank: the same init, and resume restores rank 0's
        in_ch = None if cfg.model.in_channels == "auto" else int(cfg.model.in_channels)
        data = build_data(cfg.data, seed=t.seed, in_channels=in_ch, dataset_roots=dataset_roots)
        cfg = _resolve(cfg, data)
        workers = resolve_num_workers(cfg.data.num_workers, data)
        threads = runtime.configure_threads(workers)  # a rank starts with its share (ml.launch)
        if main:
            (out / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        model = build_model(cfg.model, cfg.model.num_classes, cfg.model.in_channels,
                            grad_checkpointing=t.grad_checkpointing, image_size=data.image_size).to(device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        amp_dtype = runtime.resolve_amp(t.amp, device)
        n_micro = batches_per_epoch(len(data.train), t.batch_size)
        steps_per_epoch = math.ceil(n_micro / t.grad_accum_steps)
        optimizer = build_optimizer(model, t)
        scheduler = build_scheduler(optimizer, t, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        last = out / "checkpoints" / "last.pt"
        ckpt = load_checkpoint(last) if resume and last.exists() else None
        metrics = MetricsLog(out, None if ckpt is None else ckpt["step"], 0 if ckpt is None else ckpt["epoch"]) \
            if main else NoMetrics()
        alerts = GradAlerts(t.grad_alert.max_norm, t.grad_alert.min_norm) if main and t.grad_alert else None
        run = Run(cfg, model, optimizer, scheduler, scaler, device, amp_dtype, data, steps_per_epoch, log,
                  metrics, out, report, should_stop, ActivationMonitor(model) if t.debug else None, rank, alerts)
        start_epoch, start_batch = 0, 0
        if ckpt is not None:
            start_epoch, start_batch = restore(run, ckpt)
        else:
            log.info("training %s on %s: %d train / %d val images, %d classes, %dx%d x%d channels",
                     cfg.model.name, cfg.data.dataset, len(data.train), len(data.val), len(data.classes),
                     data.image_size, data.image_size, data.in_channels)
        if main:
            _manifest(run, dataset_roots, ckpt)
        log.info("device %s, amp %s, %d torch threads, %d loader workers, %d steps/epoch", device,
                 amp_dtype, threads, workers, steps_per_epoch)
        if rank is not None:
            run.model = rank.wrap(model)
            log.info("%d ranks (%s): %d of each batch of %d per rank", world, rank.backend, t.batch_size // world,
                     t.batch_size)
        loaders = _loaders(run, workers)
        run.profiler = _profiler(t, out, device, log) if main else None  # started here: setup is not profiled
        result = _loop(run, *loaders, start_epoch, start_batch)
        close_writer(run)  # the final (or cancel) checkpoint is on disk before the run returns
        return result
    finally:
        if run is not None:
            close_writer(run, quiet=True)  # a failing run still finishes the writes it handed over
            run.metrics.close()
            if run.monitor:
                run.monitor.close()
            if run.profiler:
                run.profiler.close()
        torch.use_deterministic_algorithms(was_deterministic)
        close_log(handlers)
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _profiler(t, out: Path, device: torch.device, log) -> StepProfiler | None:
    """training.profile's profiler; None when it is null or an earlier attempt wrote profile/trace.json."""
    if t.profile is None or (out / "profile" / "trace.json").exists():
        return None
    return StepProfiler(t.profile.steps, out, device, log)


def _manifest(run: Run, dataset_roots: Mapping[str, str] | None, ckpt: dict | None) -> None:
    """manifest.json (ml.environment); a resume appends to it and warns if the data changed."""
    resumed = None if ckpt is None else {"epoch": ckpt["epoch"], "step": ckpt["step"]}
    m = environment.write_manifest(run.out, run.cfg, run.data, run.device, run.world_size, dataset_roots, resumed)
    run.log.info("manifest: dataset %s sha256 %s (%s), kiln %s, torch %s", m["dataset"]["name"],
                 m["dataset"]["sha256"][:16], m["dataset"]["method"], m["environment"]["kiln"][:12],
                 m["environment"]["torch"])
    if m["resumes"] and m["resumes"][-1]["dataset_sha256"] != m["dataset"]["sha256"]:
        run.log.warning("the dataset changed since this run started (sha256 %s, now %s): the resumed run "
                        "trains on other data", m["dataset"]["sha256"][:16], m["resumes"][-1]["dataset_sha256"][:16])


def _loaders(run: Run, workers: int):
    """(sampler, train loader, val loader): the whole epoch in one process, a rank's shard of it in several."""
    t, data, ranks = run.cfg.training, run.data, run.ranks
    if ranks is None:
        sampler, val_sampler = EpochSampler(len(data.train), t.seed), None
    else:
        sampler, val_sampler = ranks.sampler(len(data.train), t.seed), ranks.shard(len(data.val))
    batch = t.batch_size // run.world_size
    return (sampler,
            make_loader(data.train, batch, sampler=sampler, num_workers=workers, device=run.device, seed=t.seed),
            make_loader(data.val, batch, sampler=val_sampler, num_workers=workers, device=run.device, seed=t.seed))


def _loop(run: Run, sampler, train_loader, val_loader, start_epoch: int, start_batch: int) -> TrainResult:
    t = run.cfg.training
    run.progress("start", start_epoch + 1)
    status, epoch = "completed", start_epoch
    for epoch in range(start_epoch + 1, t.epochs + 1):            # 1-based epochs
        skip = start_batch if epoch == start_epoch + 1 else 0
        sampler.set_epoch(epoch, start=skip * t.batch_size)
        t_epoch = time.monotonic()
        if not train_one_epoch(run, train_loader, epoch, start_batch=skip):
            run.progress("end", epoch)
            return _result(run, "stopped", epoch - 1)
        sums, run.partial = run.totals(run.partial), {}
        val = _validate(run, val_loader)
        elapsed = time.monotonic() - t_epoch
        run.latest.update(train_loss=sums["loss_sum"] / max(1, sums["steps"]),
                          train_accuracy=sums["correct"] / max(1, sums["seen"]), **val)
        if run.alerts is not None:
            run.alerts.end_epoch(run.log, epoch, sums["grad_alerts"])
        alerts = {} if run.alerts is None else {"grad_alerts": sums["grad_alerts"]}  # per epoch
        row = {"type": "epoch", "epoch": epoch, "step": run.step, **run.latest, **alerts,
               "time_s": round(elapsed, 3),
               "images_per_s": round((len(run.data.train) - skip * t.batch_size) / elapsed, 1)}
        run.metrics.write(row, run.step, "epoch")
        improved = run.best["val_accuracy"] is None or val["val_accuracy"] > run.best["val_accuracy"]
        if improved:
            run.best = {"val_accuracy": val["val_accuracy"], "val_loss": val["val_loss"], "epoch": epoch}
        run.log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_accuracy %.4f (best %.4f @%d) %.1fs",
                     epoch, t.epochs, run.latest["train_loss"], val["val_loss"], val["val_accuracy"],
                     run.best["val_accuracy"], run.best["epoch"], elapsed)
        if improved:
            save(run, "best", epoch)
        patience = t.early_stopping_patience
        early = patience is not None and epoch - run.best["epoch"] >= patience
        keep = t.keep_every is not None and epoch % t.keep_every == 0
        if epoch % t.checkpoint_every == 0 or epoch == t.epochs or early or keep:
            save(run, "last", epoch)
        run.progress("epoch", epoch)
        if early:
            run.log.info("early stopping: no improvement for %d epochs", patience)
            status = "early_stopped"
            break
    run.progress("end", epoch)
    return _result(run, status, epoch)


def _validate(run: Run, loader) -> dict:
    """Validation metrics; several ranks evaluate shards with rank 0's buffers and add up the counts."""
    model = unwrap(run.model)
    if run.ranks is None:
        return evaluate(model, loader, run.device, channels_last=run.cfg.model.channels_last)
    run.ranks.sync_buffers(model)
    return evaluate(model, loader, run.device, channels_last=run.cfg.model.channels_last, total=run.ranks.total)


def _result(run: Run, status: str, epochs_completed: int) -> TrainResult:
    run.log.info("%s after %d epochs, %d steps; best val_accuracy %s", status, epochs_completed, run.step,
                 run.best["val_accuracy"])
    return TrainResult(status, epochs_completed, run.step, dict(run.latest), dict(run.best),
                       run.resumed_from_epoch, str(run.out), run.world_size)


def main(argv: list[str] | None = None) -> int:
    from configs import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m ml.train", description="Train an image classifier.")
    p.add_argument("config", help="YAML job config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.lr=0.01")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds checkpoints/last.pt)")
    p.add_argument("--no-resume", action="store_true", help="start over even if last.pt exists")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        result = train(cfg, args.out, resume=not args.no_resume)
    except ConfigError as exc:
        print("\n".join(f"config error: {e.field}: {e.message}" for e in exc.errors), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
