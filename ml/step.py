"""The delicate part of the loop, in one tested function.

Order (the torchvision reference once got it wrong, see STYLE.md):
autocast forward -> loss / n_micro -> scaled backward -> [at the accumulation boundary]
unscale -> non-finite check -> clip (on unscaled grads) -> scaler.step -> scaler.update ->
zero_grad(set_to_none=True).

Under DDP the backward of the group's last micro-batch all-reduces the gradients (inner ones run
under no_sync), so the norm, the clip and the step see the synchronized, averaged gradients, and
``sync`` makes every rank take the same non-finite decision from the same loss and norm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ml.checkpoint import unwrap
from ml.runtime import autocast


@dataclass
class StepResult:
    loss: float | None           # mean loss of the group (set at the boundary; None mid-group)
    stepped: bool                # an optimizer step was attempted at this call (boundary)
    skipped: bool = False        # fp16 scaler found inf grads and skipped the step
    grad_norm: float | None = None           # global norm of the unscaled grads, before clipping
    layer_norms: dict[str, float] = field(default_factory=dict)   # per module, unscaled, before clipping
    correct: int = 0             # right predictions in this micro-batch (free: logits are at hand)


class Accumulator:
    """Loss of the micro-batches of the current accumulation group (kept as a tensor: no sync)."""

    def __init__(self):
        self.loss = None

    def add(self, loss: torch.Tensor) -> None:
        self.loss = loss if self.loss is None else self.loss + loss


def first_nonfinite_param(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


def _layer_norms(model: nn.Module) -> tuple[list[str], torch.Tensor | None]:
    """Module paths and their L2 grad norms [M], as one tensor (no host sync; None without grads)."""
    slots: dict[str, int] = {}
    index, grads = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            module = name.rsplit(".", 1)[0] if "." in name else name
            index.append(slots.setdefault(module, len(slots)))
            grads.append(p.grad.detach())
    if not grads:
        return [], None
    sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2)           # [P]
    per = torch.zeros(len(slots), device=sq.device).index_add_(0, torch.tensor(index, device=sq.device), sq)
    return list(slots), per.sqrt()                                                     # [M]


def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 grad norm per module (parameters grouped by their module path)."""
    names, norms = _layer_norms(model)
    return {} if norms is None else dict(zip(names, norms.tolist()))


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn, optimizer,
               scaler, acc: Accumulator, *, n_micro: int, boundary: bool, amp_dtype: torch.dtype | None = None,
               grad_clip: float | None = None, want_layer_norms: bool = False, step: int = 0,
               sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepResult:
    """One micro-batch; at ``boundary`` also the optimizer step.

    ``n_micro`` is the number of micro-batches in this accumulation group (smaller for the last
    group of an epoch), so the accumulated gradient is the mean over the group. ``scaler`` is a
    torch.amp.GradScaler (disabled unless fp16). ``sync`` (several ranks: ml.distributed.Rank.sync_step)
    replaces the loss and grad norm in [loss, grad_norm, correct] by their means over the ranks. Raises ValueError on a
    non-finite loss or gradient, naming the first parameter with a non-finite gradient.
    """
    with autocast(inputs.device, amp_dtype):
        logits = model(inputs)                            # [N, K]
        loss = loss_fn(logits.float(), targets) / n_micro
    scaler.scale(loss).backward()
    acc.add(loss.detach())
    correct = (logits.detach().argmax(1) == targets).sum()
    if not boundary:
        return StepResult(None, False, correct=int(correct))
    params = [p for p in model.parameters() if p.grad is not None]
    scaler.unscale_(optimizer)                            # grads are now true gradients
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    group_loss = acc.loss
    acc.loss = None
    # One host sync per optimizer step: loss, norm and accuracy together (and one all-reduce under DDP).
    stats = torch.stack([group_loss.float(), norm.float(), correct.float()])
    stats = stats if sync is None else sync(stats)
    # per-layer norms of the (already synchronized) grads, before clipping: in the same host sync
    names, per_layer = _layer_norms(unwrap(model)) if want_layer_norms else ([], None)
    values = (stats if per_layer is None else torch.cat([stats, per_layer.to(stats.dtype)])).tolist()
    loss_v, norm_v, correct_v = values[:3]
    layers = dict(zip(names, values[3:]))
    fp16 = scaler.is_enabled()
    if not math.isfinite(loss_v) or (not math.isfinite(norm_v) and not fp16):
        bad = first_nonfinite_param(unwrap(model))
        raise ValueError(
            f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient'} at step {step + 1} "
            f"(loss={loss_v}, grad_norm={norm_v}); first parameter with a non-finite gradient: {bad}. "
            "Lower training.lr, set training.grad_clip, check the data for NaN/Inf, or use amp: bf16/off")
    if grad_clip is not None and math.isfinite(norm_v):
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    scale_before = scaler.get_scale() if fp16 else None
    scaler.step(optimizer)                                # skips the step if fp16 grads overflowed
    scaler.update()
    skipped = fp16 and scaler.get_scale() < scale_before
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_v, True, skipped, norm_v, layers, int(correct_v))
