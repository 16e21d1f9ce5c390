"""The CUDA paths in one short script (``make test-gpu``): what a GPU machine must show before a release.

    python bench/gpu_check.py [--json PATH]

Checks, each PASS / FAIL / SKIP with its time: AMP bf16 and fp16 training (autocast dtype seen,
fp16 GradScaler live), pinned memory and non_blocking copies, channels_last, ``training.processes:
auto`` with NCCL (needs >= 2 GPUs), /predict's Predictor on cuda (agrees with CPU), its CUDA-graph
runtime (agrees with CPU eager at every batch size, and which runtime the load chose), and the training
throughput of Kiln's loop against a plain loop on the GPU (a measurement, not a gate). Without CUDA it
prints SKIP and exits 0; any FAIL exits 1. Data: scikit-learn's bundled digits (nothing downloads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from configs import load_config  # noqa: E402
from ml.data import build_data, make_loader  # noqa: E402
from ml.models import build_model  # noqa: E402
from ml.train import train  # noqa: E402


class Skip(Exception):
    """A check that cannot run on this machine (the reason is its message)."""


def config(**training):
    return load_config({"model": {"name": "small_cnn", "channels_last": True},
                        "data": {"dataset": "digits", "image_size": 32, "num_workers": 0},
                        "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "seed": 0, "device": "cuda",
                                     **training}})


def check_amp(out: Path) -> str:
    """bf16 and fp16 runs complete; the forward really runs in that dtype; fp16's scaler is live."""
    seen = []
    for amp, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        result = train(config(amp=amp), out / amp, console=False)
        scaler = torch.load(out / amp / "checkpoints" / "last.pt", weights_only=True)["scaler"]
        assert result.status == "completed" and result.latest["train_loss"] < 2.0, result.latest
        assert (scaler.get("scale", 0) > 0) if amp == "fp16" else not scaler, scaler   # GradScaler only for fp16
        model = build_model(config().model, 10, 1).cuda().to(memory_format=torch.channels_last)
        dtypes = []
        model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        with torch.autocast("cuda", dtype=dtype):
            model(torch.randn(4, 1, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last))
        assert dtypes == [dtype], dtypes
        seen.append(f"{amp}: val_accuracy {result.best['val_accuracy']:.3f}")
    return "; ".join(seen)


def check_pinned(out: Path) -> str:
    """The loader pins batches on CUDA and copies them with non_blocking=True."""
    data = build_data(config().data, seed=0)
    loader = make_loader(data.train, 64, device=torch.device("cuda"), seed=0)
    x, y = next(iter(loader))
    assert loader.pin_memory and x.is_pinned() and y.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xd = x.to("cuda", non_blocking=True)
    stream.synchronize()
    assert xd.is_cuda and torch.equal(xd.cpu(), x)
    return f"batch {tuple(x.shape)} pinned, copied non_blocking"


def check_channels_last(out: Path) -> str:
    """Model weights in channels_last on cuda; channels_last and contiguous inputs give the same outputs."""
    model = build_model(config().model, 10, 1).cuda().to(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 32, 32, device="cuda")
    with torch.no_grad():
        a, b = model.eval()(x.contiguous(memory_format=torch.channels_last)), model(x)
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    return "weights and activations channels_last; outputs match contiguous within 1e-3"


def check_ddp_nccl(out: Path) -> str:
    """training.processes: auto -> one rank per GPU, NCCL, the same accuracy band as one GPU."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise Skip(f"{gpus} GPU visible; NCCL ranks need >= 2")
    cfg = config(processes="auto", device="auto", batch_size=32 * gpus, epochs=5)
    result = train(cfg, out / "ddp", console=False)
    log = (out / "ddp" / "train.log").read_text()
    assert result.status == "completed" and result.world_size == gpus, result
    assert f"{gpus} ranks (nccl)" in log, log[-2000:]
    assert result.best["val_accuracy"] >= 0.9, result.best
    return f"{gpus} ranks, nccl, best val_accuracy {result.best['val_accuracy']:.3f}"


def check_predict(out: Path) -> str:
    """/predict's Predictor on cuda: same labels as on CPU, probabilities within 1e-3."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from ml.inference import Predictor

    best = out / "bf16" / "checkpoints" / "best.pt"
    if not best.exists():
        train(config(amp="bf16"), out / "bf16", console=False)
    d = load_digits()
    images = [Image.fromarray((d.images[k] * 255 / 16).round().astype("uint8"), "L") for k in range(1700, 1764)]
    gpu, cpu = Predictor.from_checkpoint(best, device="cuda"), Predictor.from_checkpoint(best, device="cpu")
    assert next(gpu.model.parameters()).is_cuda
    pg, pc = gpu.infer(gpu.preprocess(images)), cpu.infer(cpu.preprocess(images))
    assert torch.equal(pg.argmax(1), pc.argmax(1)) and torch.allclose(pg, pc, atol=1e-3), (pg - pc).abs().max()
    right = sum(int(r["label"]) == int(d.target[1700 + i]) for i, r in enumerate(gpu.postprocess(pg)))
    return f"{right}/{len(images)} held-out digits right on cuda, same labels as CPU"


def check_cuda_graphs(out: Path) -> str:
    """/predict's runtime on cuda (chosen at load): CUDA graphs, padded to their buckets and sliced past the
    largest, give CPU eager's labels and probabilities within 1e-3 at every batch size; and which serves, why."""
    import numpy as np

    from ml import runtimes
    from ml.inference import Predictor

    best = out / "bf16" / "checkpoints" / "best.pt"
    if not best.exists():
        train(config(amp="bf16"), out / "bf16", console=False)
    gpu, cpu = Predictor.from_checkpoint(best, device="cuda"), Predictor.from_checkpoint(best, device="cpu")
    graphs = runtimes.CudaGraphRuntime(gpu)
    eager = runtimes.EagerRuntime(cpu)
    x = runtimes.reference_inputs(gpu.image_size, gpu.in_channels, 80)
    for n in (1, 3, 8, 32, 40, 80):
        got, want = graphs.probabilities(x[:n]), eager.probabilities(x[:n])
        assert got.shape == want.shape and (got.argmax(1) == want.argmax(1)).all(), n
        assert np.abs(got - want).max() <= 1e-3, (n, np.abs(got - want).max())
    runtime, why = runtimes.load(gpu, "onnxruntime", best.parent)
    return f"{runtime.name} serves on cuda: {why}"


def _plain(cfg) -> float:
    """A hand-written loop on the GPU: same model, data, batch, AMP, channels_last; eval each epoch."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = build_data(cfg.data, seed=0)
    bs = cfg.training.batch_size
    train_dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train.x, data.train.y),
                                           batch_size=bs, shuffle=True, pin_memory=True)
    val_dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.val.x, data.val.y),
                                         batch_size=bs, pin_memory=True)
    model = build_model(cfg.model, 10, 1).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(cfg.training.epochs):
        model.train()
        for x, y in train_dl:
            x = x.to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(x).float(), y.to("cuda", non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in val_dl:
                logits = model(x.to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last))
                correct += int((logits.argmax(1) == y.to("cuda", non_blocking=True)).sum())
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def check_throughput(out: Path) -> str:
    """Kiln's loop (logs, metrics, TensorBoard, checkpoints) against _plain, images/s ratio."""
    cfg = config(amp="bf16", epochs=10, batch_size=128, log_every_steps=10)
    cfg_warm = config(amp="bf16", epochs=1, batch_size=128)
    n = len(build_data(cfg.data, seed=0).train) * cfg.training.epochs
    train(cfg_warm, out / "warm", console=False)
    _plain(cfg_warm)
    kiln, plain = [], []
    for i in range(3):
        t0 = time.perf_counter()
        train(cfg, out / f"kiln{i}", console=False)
        kiln.append(time.perf_counter() - t0)
        plain.append(_plain(cfg))
    k, p = n / statistics.median(kiln), n / statistics.median(plain)
    return f"kiln {k:.0f} images/s, plain {p:.0f} images/s, ratio {k / p:.3f} (CPU target >= 0.95)"


CHECKS = [check_amp, check_pinned, check_channels_last, check_predict, check_cuda_graphs, check_ddp_nccl,
          check_throughput]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("SKIP gpu_check: no CUDA device on this machine")
        return 0
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for check in CHECKS:
            t0 = time.perf_counter()
            try:
                status, detail = "PASS", check(Path(tmp))
            except Skip as exc:
                status, detail = "SKIP", str(exc)
            except Exception as exc:  # every check runs; the failure is reported with its traceback
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            results.append({"check": check.__name__[6:], "status": status, "seconds": round(time.perf_counter() - t0, 1),
                            "detail": detail})
            print(f"{status:4} {results[-1]['check']:14} {results[-1]['seconds']:6.1f}s  {detail}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "results": results}, indent=1))
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
