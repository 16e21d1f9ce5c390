"""The state of one training run: what the epoch loop mutates and what a checkpoint captures.

``Run`` holds the model, optimizer, scheduler, scaler, counters and metrics of a run in one
process (one rank of several, or the only one); ``save`` and ``restore`` move it to and from
checkpoints/last.pt and best.pt. A checkpoint holds the unwrapped model, so a run of any world
size resumes it and the registry serves it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from configs.schema import TrainConfig, to_dict
from ml import runtime
from ml.checkpoint import CheckpointWriter, snapshot, unwrap, versions


@dataclass
class TrainResult:
    status: str                      # completed | stopped | early_stopped
    epochs_completed: int
    step: int
    latest: dict
    best: dict
    resumed_from_epoch: int | None
    out_dir: str
    world_size: int = 1


@dataclass
class Run:
    """Everything the epoch loop mutates, in one place (what a checkpoint captures)."""
    cfg: TrainConfig                 # num_classes / in_channels resolved to ints
    model: nn.Module                 # DistributedDataParallel around the model when ranks is set
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    data: Any                        # ml.data.DataBundle
    steps_per_epoch: int
    log: Any
    metrics: Any                     # ml.logs.MetricsLog on rank 0, ml.logs.NoMetrics on the others
    out: Path
    report: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    monitor: Any = None              # ml.logs.ActivationMonitor (training.debug)
    ranks: Any = None                # ml.distributed.Rank when the run has several processes
    alerts: Any = None               # ml.logs.GradAlerts (training.grad_alert), on the writing process
    profiler: Any = None             # ml.logs.StepProfiler (training.profile), on the writing process
    step: int = 0
    latest: dict = field(default_factory=dict)
    best: dict = field(default_factory=lambda: {"val_accuracy": None, "val_loss": None, "epoch": None})
    partial: dict = field(default_factory=dict)   # sums of the unfinished epoch (mid-epoch resume)
    resumed_from_epoch: int | None = None
    t0: float = field(default_factory=time.monotonic)
    start_step: int = 0
    writer: CheckpointWriter | None = None      # made by the first save (rank 0 only)

    @property
    def total_steps(self) -> int:
        return self.cfg.training.epochs * self.steps_per_epoch

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (the only process, or rank 0)."""
        return self.ranks is None or self.ranks.main

    @property
    def world_size(self) -> int:
        return 1 if self.ranks is None else self.ranks.world_size

    def totals(self, sums: dict) -> dict:
        """An epoch's sums with ``correct`` and ``seen`` added up over the ranks (loss sums are
        already global: each step's loss is the ranks' mean)."""
        if self.ranks is None:
            return dict(sums)
        correct, seen = self.ranks.total([sums["correct"], sums["seen"]])
        return {**sums, "correct": int(correct), "seen": int(seen)}

    def progress(self, event: str, epoch: int) -> None:
        if self.report is None:
            return
        done = self.step - self.start_step
        eta = (time.monotonic() - self.t0) / done * (self.total_steps - self.step) if done > 0 else None
        self.report({"event": event, "epoch": epoch, "epochs": self.cfg.training.epochs, "step": self.step,
                     "total_steps": self.total_steps, "percent": round(100.0 * self.step / self.total_steps, 2),
                     "eta_s": None if eta is None else round(eta, 1), "metrics": dict(self.latest),
                     "best": dict(self.best), "resumed_from_epoch": self.resumed_from_epoch,
                     "world_size": self.world_size})


def state(run: Run, epoch_done: int, batch_in_epoch: int) -> dict:
    d = run.data
    return {"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler else None,
            "scaler": run.scaler.state_dict(), "epoch": epoch_done, "step": run.step,
            "batch_in_epoch": batch_in_epoch, "partial": dict(run.partial) if batch_in_epoch else {},
            "rng": runtime.get_rng_state(), "config": to_dict(run.cfg), "classes": list(d.classes),
            "normalization": {"mean": d.mean, "std": d.std}, "image_size": d.image_size,
            "in_channels": d.in_channels, "metrics": dict(run.latest), "best": dict(run.best),
            "world_size": run.world_size, "versions": versions()}


# What only resuming needs: last.pt keeps it; best.pt (what is evaluated, registered and served) does not.
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "partial", "batch_in_epoch")


def save(run: Run, name: str, epoch_done: int, batch_in_epoch: int = 0) -> None:
    """Hand checkpoints/<name>.pt (best.pt: weights and metadata only) to the background writer; only
    the writing process does. A last.pt at the end of an epoch divisible by ``training.keep_every``
    is also kept as checkpoints/epoch-<N>.pt. Raises here a previous write's error."""
    if not run.main:
        return
    ckpt = state(run, epoch_done, batch_in_epoch)
    if name == "best":
        ckpt = {k: v for k, v in ckpt.items() if k not in RESUME_ONLY}
    ckpt = snapshot(ckpt)  # [the only cost on the training thread: a CPU copy]
    folder = run.out / "checkpoints"
    writes = [(folder / f"{name}.pt", ckpt)]
    keep = run.cfg.training.keep_every
    if name == "last" and keep and not batch_in_epoch and epoch_done % keep == 0:
        writes.append((folder / f"epoch-{epoch_done}.pt", ckpt))
    if run.writer is None:
        run.writer = CheckpointWriter()
    run.writer.submit(writes)


def close_writer(run: Run, *, quiet: bool = False) -> None:
    """Wait until every checkpoint handed to the writer is on disk, then stop it (idempotent).

    A failed write raises here, unless ``quiet`` (the run is already failing): then it is logged.
    """
    writer, run.writer = run.writer, None
    if writer is None:
        return
    try:
        writer.close()
    except Exception:
        if not quiet:
            raise
        run.log.exception("writing a checkpoint failed")


def restore(run: Run, ckpt: dict) -> tuple[int, int]:
    """Load last.pt's state into ``run`` (before DDP wraps the model); returns (epoch, batch_in_epoch)."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None and ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    runtime.set_rng_state(ckpt["rng"])
    run.step = run.start_step = int(ckpt["step"])
    run.latest, run.best = dict(ckpt.get("metrics") or {}), dict(ckpt["best"])
    run.partial = dict(ckpt.get("partial") or {})
    if run.partial and not run.main:  # the saved counts are the ranks' totals: rank 0 carries them
        run.partial.update(correct=0, seen=0)
    run.resumed_from_epoch = int(ckpt["epoch"])
    run.log.info("resuming from checkpoint at epoch %d (step %d)", ckpt["epoch"], ckpt["step"])
    return int(ckpt["epoch"]), int(ckpt.get("batch_in_epoch") or 0)
