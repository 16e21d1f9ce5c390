"""Kiln's training loop vs a plain hand-written PyTorch loop: same model, data, batch size, threads.

    python bench/train_overhead.py [--epochs 5] [--repeats 3] [--threads 2] [--ranks 2]

Both sides build the same digits data (ml.data.build_data, no augmentation), the same small_cnn,
AdamW, and evaluate on the validation split after every epoch. Kiln additionally writes train.log,
metrics.jsonl, TensorBoard events and last.pt/best.pt checkpoints (log every 10 steps, checkpoint
every epoch). One warm-up run each, then the median of ``repeats`` timed runs, alternating sides.
Target: Kiln >= 0.95x the plain loop's images/s.

The DDP row runs the same Kiln job as ``--ranks`` gloo ranks of 1 intra-op thread each (forked
from this process), at the same global batch, against Kiln in 1 process of ``--threads`` threads:
end to end (rank start-up included) and per epoch (the epochs' own images/s in metrics.jsonl).
No target: it says what DDP costs or gains on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from configs import load_config  # noqa: E402
from ml.data import build_data  # noqa: E402
from ml.models import build_model  # noqa: E402
from ml.train import train  # noqa: E402


def config(epochs: int, batch: int):
    return load_config({
        "model": {"name": "small_cnn", "channels_last": True, "dropout": 0.1},
        "data": {"dataset": "digits", "image_size": 32, "augment": False, "num_workers": 0},
        "training": {"epochs": epochs, "batch_size": batch, "optimizer": "adamw", "lr": 3e-3,
                     "scheduler": "cosine", "amp": "off", "seed": 0, "log_every_steps": 10,
                     "checkpoint_every": 1}})


def run_kiln(cfg) -> tuple[float, float]:
    """Seconds of the whole run, and the median of its epochs' images/s."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train(cfg, out, console=False)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return seconds, statistics.median(r["images_per_s"] for r in rows if r["type"] == "epoch")


def run_ddp(cfg, ranks: int) -> tuple[float, float]:
    """run_kiln as ``ranks`` forked processes (one intra-op thread each: ml.launch.rank_threads)."""
    return run_kiln(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, processes=ranks)))


def run_plain(cfg) -> float:
    """What one would write by hand: DataLoader, forward, loss, backward, step; eval each epoch."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = build_data(cfg.data, seed=0)
    train_ds = torch.utils.data.TensorDataset(data.train.x, data.train.y)
    val_ds = torch.utils.data.TensorDataset(data.val.x, data.val.y)
    bs = cfg.training.batch_size
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=bs)
    model = build_model(cfg.model, 10, 1).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(cfg.training.epochs):
        model.train()
        for x, y in train_dl:
            loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in val_dl:
                correct += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2, help="DDP row: CPU ranks of 1 thread each (0: no DDP row)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config(args.epochs, args.batch_size)
    n_images = len(build_data(cfg.data, seed=0).train) * args.epochs
    run_kiln(config(1, args.batch_size))                              # warm-up: allocator, oneDNN kernels
    run_plain(config(1, args.batch_size))
    if args.ranks:
        run_ddp(config(1, args.batch_size), args.ranks)
    kiln, plain, ddp = [], [], []
    for _ in range(args.repeats):
        kiln.append(run_kiln(cfg))
        plain.append(run_plain(cfg))
        if args.ranks:
            ddp.append(run_ddp(cfg, args.ranks))
    k_ips, p_ips = n_images / statistics.median(t for t, _ in kiln), n_images / statistics.median(plain)
    print(f"threads={torch.get_num_threads()} batch={args.batch_size} epochs={args.epochs} "
          f"images/run={n_images} repeats={args.repeats}")
    print(f"kiln  {k_ips:8.1f} images/s  (runs: {', '.join(f'{t:.2f}s' for t, _ in kiln)})")
    print(f"plain {p_ips:8.1f} images/s  (runs: {', '.join(f'{t:.2f}s' for t in plain)})")
    ratio = k_ips / p_ips
    print(f"ratio kiln/plain = {ratio:.3f}  (target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")
    if args.ranks:
        d_ips = n_images / statistics.median(t for t, _ in ddp)
        d_epoch, k_epoch = statistics.median(e for _, e in ddp), statistics.median(e for _, e in kiln)
        print(f"ddp   {d_ips:8.1f} images/s  ({args.ranks} ranks x 1 thread, global batch {args.batch_size}; "
              f"runs: {', '.join(f'{t:.2f}s' for t, _ in ddp)})")
        print(f"ratio ddp/kiln = {d_ips / k_ips:.3f} end to end, {d_epoch / k_epoch:.3f} per epoch "
              f"({d_epoch:.1f} vs {k_epoch:.1f} images/s; kiln: 1 process x {args.threads} threads)")


if __name__ == "__main__":
    main()
