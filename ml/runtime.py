"""Process-level knobs of a run: device, AMP, threads, seeding, determinism, RNG state."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available else cpu; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device is {name!r} but CUDA is not available; use device: auto or cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for amp auto|bf16|fp16|off (auto: bf16/fp16 on CUDA, off on CPU)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op when AMP is off."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def configure_threads(num_workers: int) -> int:
    """Lower torch's intra-op threads so main process + loader workers fit the CPUs.

    Never raises the count: a caller (test, worker, OMP_NUM_THREADS) that chose fewer is respected.
    """
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("KILN_TORCH_THREADS"):
        return torch.get_num_threads()
    want = max(1, available_cpus() - num_workers)
    if want < torch.get_num_threads():
        torch.set_num_threads(want)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_determinism(deterministic: bool, device: torch.device) -> bool:
    """Deterministic algorithms (bit-exact CPU resume) or cudnn autotuning; returns the previous flag."""
    previous = torch.are_deterministic_algorithms_enabled()
    if deterministic and device.type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; must be set before it initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = (not deterministic) and device.type == "cuda"
    return previous


def get_rng_state() -> dict:
    """All RNG states as plain data (tensors/ints), loadable with weights_only=True."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
