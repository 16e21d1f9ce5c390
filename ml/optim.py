"""Optimizer and learning-rate scheduler factories (schedulers step once per optimizer step)."""
from __future__ import annotations

import math

import torch
from torch import nn

from configs.schema import TrainingConfig


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """sgd | adam | adamw; no weight decay on norm weights and biases (1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd, adam or adamw")


def lr_factor(step: int, cfg: TrainingConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (none/cosine/warmup/step)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup_epochs = cfg.warmup_epochs or (1 if cfg.scheduler == "warmup" else 0)
    warmup = min(total - 1, warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "step":
        return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    if cfg.scheduler == "none":
        return 1.0
    if step < warmup:                                     # linear warm-up from lr/warmup
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))   # cosine to 0 (cosine / warmup+cosine)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int):
    """A scheduler stepped after every optimizer step, or None for scheduler: none."""
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(2, cfg.epochs * steps_per_epoch))
    # A plain function (not a callable object) keeps LambdaLR.state_dict free of config objects.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))
