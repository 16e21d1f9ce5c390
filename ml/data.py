"""Datasets (digits, fake, imagefolder / uploaded id), the split, transforms and DataLoaders.

Determinism: the split is a function of the seed; each epoch's shuffle order and every sample's
augmentation are functions of (seed, epoch, index), so a run resumed mid-epoch sees exactly the
batches an uninterrupted run would, whatever the number of loader workers.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from configs.schema import DataConfig
from ml import folders
from ml.images import base_array, to_channels

_STATS_MAX_IMAGES = 2000      # normalisation stats from at most this many training images
_TENSORISE_MAX_BYTES = 1 << 30  # in-memory datasets below this are pre-tensorised once


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL L/RGB uint8 -> float tensor [C,H,W] in 0..1."""
    arr = np.asarray(image, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def base_tensor(image: Image.Image, image_size: int, in_channels: int) -> torch.Tensor:
    """Channels -> square resize -> [C,S,S] in 0..1 (un-normalised)."""
    arr = base_array(image, image_size, in_channels)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel; x is [C,H,W] or [N,C,H,W], mean/std are [C]."""
    shape = (-1, 1, 1)
    return x.sub(mean.view(shape)).div(std.view(shape))


class EvalTransform:
    """The ONE eval transform (evaluation, inference): PIL image -> normalised float tensor [C,S,S].

    Two stages, so a server can run the cheap per-image half (``to_array``: decode-side PIL
    work) in request threads and the tensor half (``batch``) once for a whole batch; both
    orders give bit-identical tensors.
    """

    def __init__(self, image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size, self.in_channels = int(image_size), int(in_channels)
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean/std need {self.in_channels} values, got {len(self.mean)}/{len(self.std)}")

    def to_array(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode, any size) -> uint8 array [S,S,C]."""
        return base_array(image, self.image_size, self.in_channels)

    def batch(self, arrays: Sequence[np.ndarray] | np.ndarray, *,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """uint8 arrays [S,S,C] (or one array [N,S,S,C]) -> normalised float Tensor[N,C,S,S]."""
        stacked = arrays if isinstance(arrays, np.ndarray) else np.stack(arrays)
        if not stacked.flags.writeable:
            stacked = stacked.copy()
        x = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0)
        return normalize(x, self.mean, self.std).contiguous(memory_format=memory_format)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize(base_tensor(image, self.image_size, self.in_channels), self.mean, self.std)


def eval_transform(image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """PIL.Image (any mode) -> converted to ``in_channels`` -> resized -> tensor -> normalised."""
    return EvalTransform(image_size, in_channels, mean, std)


class TrainTransform:
    """Train-time augmentation for decoded images: random resized crop + horizontal flip."""

    def __init__(self, image_size: int, in_channels: int, mean, std):
        from torchvision import transforms as T

        self.in_channels = in_channels
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.ops = T.Compose([T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip()])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize(_to_tensor(self.ops(to_channels(image, self.in_channels))), self.mean, self.std)


# ------------------------------------------------------------------ sources

@dataclass
class Source:
    """Indexable raw samples: ``load(i) -> PIL image``, integer ``labels``, class names."""
    load: Callable[[int], Image.Image]
    labels: np.ndarray
    classes: list[str]
    channels: int           # natural channel count (used when in_channels is auto)
    in_memory: bool


def _digits_image(images: np.ndarray, i: int) -> Image.Image:
    return Image.fromarray(images[i], "L")


def load_source(cfg: DataConfig, dataset_roots: Mapping[str, str] | None = None) -> Source:
    """Resolve data.dataset (digits | fake | imagefolder | uploaded id) to a Source."""
    import functools

    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255, [N,8,8]
        return Source(functools.partial(_digits_image, images), d.target.astype(np.int64),
                      [str(i) for i in range(10)], 1, True)
    if cfg.dataset == "fake":
        from torchvision.datasets import FakeData

        fake = FakeData(cfg.fake_samples, (3, cfg.image_size, cfg.image_size), cfg.fake_classes)
        labels = np.array([int(fake[i][1]) for i in range(len(fake))], dtype=np.int64)
        return Source(lambda i: fake[i][0], labels, [str(i) for i in range(cfg.fake_classes)], 3, True)
    root = cfg.root
    if cfg.dataset != "imagefolder":
        root = (dataset_roots or {}).get(cfg.dataset)
        if root is None:
            raise ValueError(f"dataset {cfg.dataset} is not available to this trainer; upload it first "
                             "(POST /v1/datasets) or use dataset: imagefolder with a root")
    if root is None:
        raise ValueError("data.root is required with dataset: imagefolder (a folder of <class>/<image> files)")
    return folder_source(root)


def folder_source(root: str, classes: Sequence[str] | None = None) -> Source:
    """An ImageFolder-layout folder as a Source; ``classes`` (a model's) fixes the label indices."""
    listing = folders.labelled(root)
    classes = list(classes) if classes is not None else listing.classes
    unknown = sorted(set(listing.labels) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the classes {classes}")
    if len(classes) < 2:
        raise ValueError(f"data.root {root} has {len(classes)} class folder(s); need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in listing.labels], dtype=np.int64)
    return Source(lambda i: folders.open_rgb(listing.files[i]), labels, classes, 3, False)


def split_indices(labels: np.ndarray, val_split: float, seed: int, subset: int | None = None):
    """Deterministic (stratified where possible) train/val indices; subset = first N after a seeded shuffle."""
    from sklearn.model_selection import train_test_split

    order = np.random.default_rng(seed).permutation(len(labels))
    if subset:
        order = order[:subset]
    n = len(order)
    if n < 2:
        raise ValueError(f"dataset has {n} sample(s); need at least 2 for a train/val split")
    n_val = min(max(1, round(n * val_split)), n - 1)
    y = labels[order]
    counts = np.bincount(y)
    counts = counts[counts > 0]
    stratify = y if counts.min() >= 2 and n_val >= len(counts) and n - n_val >= len(counts) else None
    train, val = train_test_split(order, test_size=n_val, random_state=seed % 2**32, stratify=stratify)
    return np.sort(train), np.sort(val)


# ------------------------------------------------------------------ datasets

def _key(key) -> tuple[int, int | None]:
    """Samplers yield (index, augmentation seed); plain ints (evaluation) mean no augmentation."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


class TensorImages(Dataset):
    """Pre-tensorised, normalised images [N,C,S,S]; augmentation = random shift by up to ``pad`` px."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad: int = 0, fill: torch.Tensor | None = None):
        self.x, self.y, self.pad = x, y, pad
        self.size = x.shape[-1]
        if pad:
            # Pad once with the normalised value of black, then crop views per sample.
            n, c, h, w = x.shape
            self.padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
            self.padded[:, :, pad:pad + h, pad:pad + w] = x

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        i, seed = _key(key)
        if seed is None or not self.pad:
            return self.x[i], self.y[i]
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.padded[i, :, dy:dy + self.size, dx:dx + self.size], self.y[i]


class LazyImages(Dataset):
    """Decodes images on demand (large / on-disk datasets); augmentation seeded per sample."""

    def __init__(self, source: Source, indices: np.ndarray, transform, train_transform=None):
        self.source, self.indices = source, indices
        self.transform, self.train_transform = transform, train_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        i, seed = _key(key)
        j = int(self.indices[i])
        image, label = self.source.load(j), int(self.source.labels[j])
        if seed is None or self.train_transform is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG stream
            torch.manual_seed(seed)
            return self.train_transform(image), label


class EpochSampler(Sampler):
    """Shuffle order and augmentation seeds are functions of (seed, epoch); can start mid-epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` skips that many samples (resume after ``start/batch`` batches)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.n - self.start)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**62, self.n)
        for i in order[self.start:].tolist():
            yield (i, int(seeds[i]))


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    train_indices: np.ndarray
    val_indices: np.ndarray


def _stats(source: Source, indices: np.ndarray, image_size: int, channels: int):
    step = max(1, len(indices) // _STATS_MAX_IMAGES)
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq, count = torch.zeros_like(total), 0
    for j in indices[::step]:
        t = base_tensor(source.load(int(j)), image_size, channels).double()
        total += t.sum((1, 2))
        total_sq += (t * t).sum((1, 2))
        count += t.shape[1] * t.shape[2]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant images: don't divide by ~0
    return mean.float().tolist(), std.float().tolist()


def build_data(cfg: DataConfig, *, seed: int, in_channels: int | None = None,
               dataset_roots: Mapping[str, str] | None = None, normalization: Mapping | None = None,
               image_size: int | None = None) -> DataBundle:
    """Load, split and transform the dataset; stats from the training split unless ``normalization`` given."""
    source = load_source(cfg, dataset_roots)
    channels = in_channels or source.channels
    size = image_size or cfg.image_size
    train_idx, val_idx = split_indices(source.labels, cfg.val_split, seed, cfg.subset)
    n, pad = len(source.labels), max(1, size // 8)
    tensorise = source.in_memory and n * channels * size * size * 4 <= _TENSORISE_MAX_BYTES
    if tensorise:
        x = torch.stack([base_tensor(source.load(i), size, channels) for i in range(n)])  # [N,C,S,S] 0..1
    if normalization:
        mean, std = list(normalization["mean"]), list(normalization["std"])
    elif tensorise:
        xt = x[torch.from_numpy(train_idx)].double()
        mean, std = xt.mean((0, 2, 3)), xt.std((0, 2, 3), unbiased=False)
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        mean, std = mean.float().tolist(), std.float().tolist()
    else:
        mean, std = _stats(source, train_idx, size, channels)
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if tensorise:
        xn, y = normalize(x, m, s), torch.from_numpy(source.labels)
        ti, vi = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        train = TensorImages(xn[ti], y[ti], pad if cfg.augment else 0, normalize(torch.zeros(channels, 1, 1), m, s))
        val = TensorImages(xn[vi], y[vi])
    else:
        ev = EvalTransform(size, channels, mean, std)
        aug = TrainTransform(size, channels, mean, std) if cfg.augment else None
        train, val = LazyImages(source, train_idx, ev, aug), LazyImages(source, val_idx, ev)
    return DataBundle(train, val, source.classes, channels, size, mean, std, train_idx, val_idx)


# ------------------------------------------------------------------ loaders

def resolve_num_workers(num_workers: int | str, bundle: DataBundle) -> int:
    """auto: 0 for pre-tensorised data (nothing to parallelise), else CPUs - 1 (at most 8)."""
    if num_workers != "auto":
        return int(num_workers)
    if isinstance(bundle.train, TensorImages):
        return 0
    from ml.runtime import available_cpus

    return max(1, min(8, available_cpus() - 1))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (base_seed + id); give numpy/random the same for third-party transforms.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, *, sampler: Sampler | None = None, num_workers: int = 0,
                device: torch.device | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader with pinned memory on CUDA, persistent seeded workers and no surprises."""
    workers = int(num_workers)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
        pin_memory=device is not None and device.type == "cuda", drop_last=False,
        persistent_workers=workers > 0, worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if workers else None)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
