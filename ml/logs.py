"""Run outputs besides checkpoints: train.log, metrics.jsonl, TensorBoard, debug activation ranges."""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import torch
from torch import nn

from ml.files import atomic_write

LOGGER = "kiln.ml"


class _ThisThread(logging.Filter):
    """Only records of the thread that started the run (two runs in one process don't mix logs)."""

    def __init__(self):
        super().__init__()
        self.ident = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


def open_log(path: Path, console: bool) -> tuple[logging.Logger, list[logging.Handler]]:
    """Attach file (and console) handlers to the "kiln.ml" logger; close them with close_log."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_ThisThread())
        logger.addHandler(h)
    return logger, handlers


def close_log(handlers: list[logging.Handler]) -> None:
    logger = logging.getLogger(LOGGER)
    for h in handlers:
        logger.removeHandler(h)
        h.close()


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard scalars, both keyed by global step."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, resume_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate(resume_step, resume_epoch)
        # purge_step hides events past the checkpoint that an interrupted run had written.
        self.tb = SummaryWriter(str(out_dir / "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)
        self.file = open(self.path, "a", encoding="utf-8")

    def _truncate(self, step: int, epoch: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line from a killed run
            if row.get("step", 0) > step or (row.get("type") == "epoch" and row.get("epoch", 0) > epoch):
                continue
            keep.append(line)
        atomic_write(self.path, "".join(x + "\n" for x in keep).encode("utf-8"))

    def write(self, row: dict, step: int, tb_prefix: str) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                self.tb.add_scalar(f"{tb_prefix}/{key}", value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    self.tb.add_scalar(f"{key}/{sub}", v, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class NoMetrics:
    """What ranks other than rank 0 write: nothing (rank 0 records the ranks' reduced metrics)."""

    def write(self, row: dict, step: int, tb_prefix: str) -> None:
        pass

    def close(self) -> None:
        pass


class ActivationMonitor:
    """debug: forward hooks record each leaf module's output range and fail fast on NaN/Inf."""

    def __init__(self, model: nn.Module):
        self.ranges: dict[str, tuple[float, float]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if name and not any(True for _ in m.children())]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
                lo, hi = torch.aminmax(output.detach())
                lo, hi = float(lo), float(hi)
                if not (torch.isfinite(torch.tensor([lo, hi])).all()):
                    raise ValueError(f"non-finite activation in module '{name}' ({type(module).__name__}): "
                                     f"range [{lo}, {hi}]; lower training.lr or check the inputs")
                self.ranges[name] = (lo, hi)
        return hook

    def log(self, logger: logging.Logger, step: int) -> None:
        for name, (lo, hi) in self.ranges.items():
            logger.info("step %d activation %s range [%.4g, %.4g]", step, name, lo, hi)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class GradAlerts:
    """training.grad_alert: layers whose gradient norm leaves [min_norm, max_norm].

    Each (layer, direction) is logged as a warning the first time it happens in an epoch, with the
    step; ``end_epoch`` logs the epoch's summary and returns its count (metrics: ``grad_alerts``).
    """

    def __init__(self, max_norm: float | None, min_norm: float | None):
        self.max_norm, self.min_norm = max_norm, min_norm
        self.seen: dict[tuple[str, str], list] = {}   # (layer, "over"|"under") -> [steps, extreme norm]

    def check(self, norms: dict[str, float], logger: logging.Logger, epoch: int, step: int) -> int:
        """Count (and warn about the first of) the layers of one step's norms that are out of range."""
        n = 0
        for layer, v in norms.items():
            if self.max_norm is not None and v > self.max_norm:
                kind, bound, worse = "over", self.max_norm, max
            elif self.min_norm is not None and v < self.min_norm:
                kind, bound, worse = "under", self.min_norm, min
            else:
                continue
            n += 1
            entry = self.seen.get((layer, kind))
            if entry is None:
                logger.warning("gradient alert: epoch %d step %d layer %s grad norm %.3g is %s %s (%s)", epoch,
                               step, layer, v, "above max_norm" if kind == "over" else "below min_norm", f"{bound:g}",
                               "exploding" if kind == "over" else "vanishing")
                self.seen[(layer, kind)] = [1, v]
            else:
                entry[0] += 1
                entry[1] = worse(entry[1], v)
        return n

    def end_epoch(self, logger: logging.Logger, epoch: int, count: int) -> None:
        """Log the epoch's alerts by layer (nothing when there were none) and start the next epoch afresh."""
        if count:
            parts = [f"{layer} {kind} ({steps} steps, extreme {v:.3g})"
                     for (layer, kind), (steps, v) in sorted(self.seen.items())]
            logger.warning("epoch %d: %d gradient alerts: %s", epoch, count, ", ".join(parts))
        self.seen.clear()


class StepProfiler:
    """training.profile: torch.profiler over ``steps`` optimizer steps after WARMUP ones; writes
    ``profile/trace.json`` (Chrome trace format) and logs the top operators by self CPU time."""

    WARMUP = 2
    TOP = 10

    def __init__(self, steps: int, out_dir: Path, device: torch.device, logger: logging.Logger):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.steps, self.path, self.log, self.done = steps, out_dir / "profile" / "trace.json", logger, False
        self.calls = 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, on_trace_ready=self._ready,
                            schedule=schedule(wait=0, warmup=self.WARMUP, active=steps, repeat=1))
        self.prof.start()
        self.log.info("profiling %d training steps after %d warm-up steps", steps, self.WARMUP)

    def step(self) -> None:
        """Call after each optimizer step."""
        if not self.done:
            self.calls += 1
            self.prof.step()

    def _ready(self, prof) -> None:
        self.done = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(self.path)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.TOP)
        recorded = min(self.steps, self.calls - self.WARMUP)  # fewer when the run ended first
        self.log.info("profile: trace of %d steps in %s; top %d operators by self CPU time:\n%s", recorded,
                      self.path.relative_to(self.path.parents[1]), self.TOP, table)

    def close(self) -> None:
        """Stop profiling; a run that ended inside the recorded steps exports what it recorded."""
        if self.done:
            return
        try:
            self.prof.stop()
        finally:
            if not self.done:
                self.done = True
                self.log.warning("profile: the run ended before the %d warm-up steps; no trace written",
                                 self.WARMUP)
