"""Inside a rank of a DistributedDataParallel run: what the training loop uses there.

``Rank`` is one process's view of the group (its index and device, DDP, its shard of the data,
the reductions, the stop flag rank 0 passes on); ``ShardedSampler`` is torch's DistributedSampler
over the 1-process order; ``no_sync`` skips the gradient all-reduce on inner accumulation steps.
ml.launch starts the ranks and builds their Rank.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ml.data import EpochSampler


class ShardedSampler(DistributedSampler):
    """torch's DistributedSampler over EpochSampler's order: rank r takes every world-th
    (index, augmentation seed) of the epoch's global order, padded so every rank gets as many.

    The global order and each sample's augmentation are those of a 1-process run, so a global
    batch holds the same samples for any number of ranks; ``set_epoch(epoch, start)`` seeds the
    epoch and skips ``start`` samples of it (a mid-epoch resume, whatever the old world size).
    """

    def __init__(self, n: int, seed: int, rank: int, world_size: int):
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.order = EpochSampler(n, seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.order.set_epoch(epoch, start)
        self.num_samples = math.ceil(len(self.order) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        items = list(self.order)                              # [(index, augmentation seed)] from ``start`` on
        if items and len(items) < self.total_size:            # pad with the first ones, as DistributedSampler does
            items += (items * math.ceil(self.total_size / len(items)))[:self.total_size - len(items)]
        return iter(items[self.rank:self.total_size:self.num_replicas])


def no_sync(model: torch.nn.Module, inner: bool):
    """DDP's no_sync for an inner micro-batch of an accumulation group: its gradients stay local and
    are all-reduced once, with the group's last micro-batch."""
    if inner and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class Rank:
    """One rank's view of the group: its index, device, the launcher's channel and the collectives."""

    def __init__(self, index: int, world_size: int, device_type: str, stop, conn):
        self.index, self.world_size = index, world_size
        self.device = torch.device("cuda", index) if device_type == "cuda" else torch.device("cpu")
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        self._stop, self._conn = stop, conn    # the launcher's stop Event, this rank's channel to it
        self._flag: torch.Tensor | None = None

    @property
    def main(self) -> bool:
        return self.index == 0

    def report(self, progress: dict) -> None:
        """Rank 0's progress, handed to the launcher's ``report``."""
        self._conn.send(("progress", progress))

    def wrap(self, model: torch.nn.Module) -> DistributedDataParallel:
        """DDP around ``model``: rank 0's weights and buffers are broadcast now, gradients averaged in backward."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sampler(self, n: int, seed: int) -> ShardedSampler:
        return ShardedSampler(n, seed, self.index, self.world_size)

    def shard(self, n: int) -> list[int]:
        """This rank's share of an evaluation set: every world-th sample, none twice."""
        return list(range(self.index, n, self.world_size))

    def total(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sync_step(self, stats: torch.Tensor) -> torch.Tensor:
        """stats [loss, grad_norm, correct] of this rank -> loss and grad_norm averaged over ranks
        (correct stays this rank's), in one all-reduce that also carries rank 0's stop flag.

        Every rank then sees the same loss and norm, so all make the same non-finite decision and
        the same stop decision at this step boundary.
        """
        flag = 1.0 if self.main and self._stop.is_set() else 0.0
        t = torch.cat([stats[:2].float(), stats.new_tensor([flag], dtype=torch.float32)])
        dist.all_reduce(t)
        self._flag = t[2]
        return torch.cat([t[:2] / self.world_size, stats[2:].float()])

    @property
    def stopped(self) -> bool:
        """Whether the last step's all-reduce carried a stop (the same answer on every rank)."""
        return self._flag is not None and bool(self._flag > 0)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running stats) on every rank: evaluation matches the saved model."""
        for b in model.buffers():
            dist.broadcast(b, 0)
