"""Loading an on-disk dataset: DataLoader worker processes (num_workers: auto) against none (0).

    python bench/data_loading.py [--images 1797] [--size 64] [--image-size 32] [--epochs 2]

Writes scikit-learn's digits as PNG files in ImageFolder layout (upscaled to --size, so decoding
and resizing cost what small real photos do; trained at --image-size, the default 32), then
measures, for num_workers auto and 0:
- the loader alone: training-split images per second through ml.data's DataLoader;
- training: images per second of ml.train (small_cnn, the default config otherwise).
Both sides run in one process, in alternation, after a warm-up; the ratio auto/0 is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from configs import load_config  # noqa: E402
from ml.data import build_data, make_loader, resolve_num_workers  # noqa: E402
from ml.train import train  # noqa: E402


def write_folder(root: Path, count: int, size: int) -> None:
    d = load_digits()
    for k in range(count):
        folder = root / str(d.target[k % len(d.target)])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.rint(d.images[k % len(d.target)] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{k}.png")


def loader_rate(cfg, root: str, workers) -> tuple[float, int]:
    bundle = build_data(cfg.data, seed=0, dataset_roots={}, image_size=cfg.data.image_size)
    n = resolve_num_workers(workers, bundle)
    loader = make_loader(bundle.train, cfg.training.batch_size, num_workers=n, seed=0)
    started, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - started), n


def train_rate(cfg, out: Path) -> float:
    started = time.perf_counter()
    result = train(cfg, out, console=False)
    images = result.step * cfg.training.batch_size
    return images / (time.perf_counter() - started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1797)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        write_folder(root, args.images, args.size)
        os.environ["KILN_DATA_ROOTS"] = tmp

        def cfg(workers):
            return load_config({"data": {"dataset": "imagefolder", "root": str(root), "image_size": args.image_size,
                                         "num_workers": workers},
                                "training": {"epochs": args.epochs}})

        loader, training = {}, {}
        loader_rate(cfg(0), str(root), 0)  # warm-up: page cache, imports
        for workers in ("auto", 0, "auto", 0):
            rate, n = loader_rate(cfg(workers), str(root), workers)
            loader.setdefault(workers, []).append((rate, n))
        for workers in ("auto", 0):
            training[workers] = train_rate(cfg(workers), Path(tmp) / f"run-{workers}")
    best = {w: max(r for r, _ in runs) for w, runs in loader.items()}
    n_auto = loader["auto"][0][1]
    print(f"on-disk ImageFolder: {args.images} PNG images of {args.size}x{args.size}, trained at "
          f"{args.image_size}x{args.image_size}, {os.cpu_count()} CPUs")
    print(f"loader alone : num_workers auto ({n_auto}) {best['auto']:8.0f} img/s   0: {best[0]:8.0f} img/s   "
          f"ratio {best['auto'] / best[0]:.2f}x")
    print(f"training     : num_workers auto ({n_auto}) {training['auto']:8.0f} img/s   0: {training[0]:8.0f} img/s   "
          f"ratio {training['auto'] / training[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
