"""Serving runtimes of a model version (eager, ONNX Runtime, torch.compile, bf16), built, checked and timed.

``build`` measures each candidate on the version's own input shape and keeps the fastest whose
outputs agree with eager; ``load`` brings the chosen one back without unpickling anything.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from configs.names import SERVING_RUNTIMES
from ml.inference import Predictor

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
CROPPED_KEY = "kiln.cropped_convs"  # model.onnx metadata: Convs whose padding-only kernel taps were cut
CANDIDATES = SERVING_RUNTIMES
# compile: tens of seconds to build on a small CPU, built again at every load (its caches are
# pickles); bf16: lossy. Both are measured only when asked for.
DEFAULT_CANDIDATES = ("onnxruntime",)
TOLERANCE = 1e-4       # most a probability may differ from eager's (fp32 runtimes)
BF16_TOLERANCE = 2e-2  # bf16 keeps 8 mantissa bits
REFERENCE_INPUTS = 32  # the reference batch, also the batch size timed beside batch 1
MEASURE_S = 0.25       # timing budget per (runtime, batch size); the minimum of the runs counts
MAX_RUNS = 40
_BUILT: OrderedDict = OrderedDict()  # (weights sha256, candidates) -> (section, onnx bytes): same weights, same build
_BUILT_MAX = 4


class Runtime(Protocol):
    name: str

    def probabilities(self, arrays: np.ndarray, threads: int = 1) -> np.ndarray:
        """uint8 inputs [N,S,S,C] from ``Predictor.prepare`` -> float32 class probabilities [N,K]."""


class ServingGraph(torch.nn.Module):
    """The whole eval path as one module: uint8 [N,S,S,C] -> normalise -> model -> softmax [N,K]."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.model = predictor.model
        c = predictor.in_channels
        self.register_buffer("mean", torch.tensor(predictor.mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(predictor.std, dtype=torch.float32).view(1, c, 1, 1))
        self.channels_last = predictor.channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float().div(255.0)      # [N,C,S,S] in 0..1
        x = x.sub(self.mean).div(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.model(x).float(), dim=1)  # [N,K]


class EagerRuntime:
    """The Predictor itself (the caller sets torch's intra-op threads)."""

    name = "eager"

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def probabilities(self, arrays: np.ndarray, threads: int = 1) -> np.ndarray:
        return self.predictor.infer(self.predictor.batch(arrays)).numpy()


class OnnxRuntime:
    """An ONNX file (protobuf: nothing is unpickled) run by ONNX Runtime's CPU provider; one session per
    intra-op thread count, created on first use. ``run`` releases the GIL and is thread-safe."""

    name = "onnxruntime"

    def __init__(self, path: str | Path):
        import onnxruntime  # noqa: F401 - fail at load, not at the first request

        self.path = str(path)
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()
        meta = self._session(1).get_modelmeta().custom_metadata_map
        self.cropped_convs = int(meta.get(CROPPED_KEY, 0))

    def _session(self, threads: int):
        session = self._sessions.get(threads)
        if session is None:
            import onnxruntime as ort

            with self._lock:
                session = self._sessions.get(threads)
                if session is None:
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
                    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting
                    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
                    self._sessions[threads] = session
        return session

    def probabilities(self, arrays: np.ndarray, threads: int = 1) -> np.ndarray:
        return self._session(max(1, threads)).run(None, {"inputs": np.ascontiguousarray(arrays)})[0]


class TorchGraphRuntime:
    """ServingGraph under torch.compile (``compile``) or bf16 autocast (``bf16``)."""

    def __init__(self, predictor: Predictor, name: str):
        self.name = name
        graph = ServingGraph(predictor).eval()
        self.fn = torch.compile(graph, dynamic=True) if name == "compile" else graph
        self.autocast = name == "bf16"

    def probabilities(self, arrays: np.ndarray, threads: int = 1) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(arrays))
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
            return self.fn(x).float().numpy()


class CudaGraphRuntime:
    """ServingGraph on a CUDA device, captured as one CUDA graph per batch bucket (1, 2, 4 ... 32): a forward
    pass is one graph launch instead of one kernel launch per operator, which is what small batches pay
    for on a GPU. A batch is padded up to its bucket (rows are independent in eval mode); a larger one
    runs in slices of the largest. Every bucket is captured when the runtime is made, each capture
    local to its thread, so requests for other models on other threads never meet a capture."""

    name = "cudagraph"
    BUCKETS = (1, 2, 4, 8, 16, 32)

    def __init__(self, predictor: Predictor):
        if predictor.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.device = predictor.device
        self.shape = (predictor.image_size, predictor.image_size, predictor.in_channels)
        graph = ServingGraph(predictor).eval()
        self._graphs = {b: self._capture(graph, b) for b in self.BUCKETS}

    def _capture(self, graph: ServingGraph, bucket: int) -> tuple:
        static_in = torch.zeros((bucket, *self.shape), dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(side):  # warm-up runs (cuDNN picks its kernels) outside the capture
                for _ in range(3):
                    graph(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured, capture_error_mode="thread_local"):
                static_out = graph(static_in)
        return captured, static_in, static_out, threading.Lock()

    def probabilities(self, arrays: np.ndarray, threads: int = 1) -> np.ndarray:
        n, top = len(arrays), self.BUCKETS[-1]
        if n > top:
            return np.concatenate([self.probabilities(arrays[i:i + top]) for i in range(0, n, top)])
        captured, static_in, static_out, lock = self._graphs[next(b for b in self.BUCKETS if b >= n)]
        x = torch.from_numpy(np.ascontiguousarray(arrays))
        with lock:  # one static input and output per bucket
            static_in[:n].copy_(x)
            static_in[n:].zero_()
            captured.replay()
            return static_out[:n].float().cpu().numpy()


def cuda_runtime(predictor: Predictor) -> tuple[Runtime, str]:
    """On a CUDA device (where a card's CPU runtime does not apply), chosen when the version is loaded:
    CUDA graphs if they agree with eager on the reference batch and are faster, else eager; and why."""
    eager = EagerRuntime(predictor)
    reference = reference_inputs(predictor.image_size, predictor.in_channels)
    try:
        graphs = CudaGraphRuntime(predictor)
        check = agreement(graphs.probabilities(reference), eager.probabilities(reference).astype(np.float64))
        if not agrees(check, TOLERANCE):
            return eager, f"cudagraph disagreed with eager ({check}); eager serves on {predictor.device}"
        fast, slow = measure(graphs, reference), measure(eager, reference)
    except Exception as exc:  # noqa: BLE001 - serve eager rather than not at all
        return eager, f"cudagraph could not be built ({type(exc).__name__}: {exc}); eager serves on {predictor.device}"
    if fast["score_ms"] < slow["score_ms"]:
        return graphs, (f"cudagraph: {fast['score_ms']:g} against eager's {slow['score_ms']:g} ms on "
                        f"{predictor.device}, top-1 identical, probabilities within {check['max_abs_diff']:.1e}")
    return eager, f"cudagraph was no faster ({fast['score_ms']:g} against {slow['score_ms']:g} ms); eager serves"


# ------------------------------------------------------------------ checks

def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def reference_inputs(image_size: int, in_channels: int, n: int = REFERENCE_INPUTS, seed: int = 0) -> np.ndarray:
    """A fixed uint8 batch [n,S,S,C]: flat greys, gradients, stripes and seeded noise."""
    rng = np.random.default_rng(seed)
    s, out = image_size, rng.integers(0, 256, (n, image_size, image_size, in_channels), dtype=np.uint8)
    ramp = np.linspace(0, 255, s, dtype=np.float64)
    fixed = [np.full((s, s), v) for v in (0, 128, 255)] + [np.tile(ramp, (s, 1)), np.tile(ramp[:, None], (1, s)),
                                                            (np.indices((s, s)).sum(0) % 4 < 2) * 255.0]
    for i, img in enumerate(fixed[:n]):
        out[i] = np.rint(img).astype(np.uint8)[:, :, None]
    return out


def agreement(probs: np.ndarray, expected: np.ndarray) -> dict:
    """How a runtime's probabilities [N,K] compare with eager's: top-1 identical, share equal, largest |difference|."""
    same = probs.argmax(1) == expected.argmax(1)
    return {"top1_identical": bool(same.all()), "top1_agreement": float(same.mean()),
            "max_abs_diff": float(np.abs(probs.astype(np.float64) - expected).max())}


def agrees(check: dict, tolerance: float) -> bool:
    return check["top1_identical"] and check["max_abs_diff"] <= tolerance


def measure(runtime: Runtime, batch: np.ndarray, budget_s: float = MEASURE_S) -> dict:
    """Milliseconds for one input alone and per input of ``batch`` (minimum of runs, one intra-op thread)."""
    out = {}
    for label, x in (("batch_1_ms", batch[:1]), (f"batch_{len(batch)}_ms_per_input", batch)):
        runtime.probabilities(x)  # warm-up: allocations, lazy init
        best, runs, start = float("inf"), 0, time.perf_counter()
        while runs < 3 or (runs < MAX_RUNS and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            runtime.probabilities(x)
            best, runs = min(best, time.perf_counter() - t0), runs + 1
        out[label] = round(1000 * best / len(x), 4)
    out["score_ms"] = round(sum(out.values()), 4)
    return out


# ------------------------------------------------------------------ build

def export_onnx(predictor: Predictor, path: str | Path) -> Path:
    """Write the ServingGraph as ONNX (dynamic batch; input ``inputs`` uint8, output ``probabilities``)."""
    graph = ServingGraph(predictor).eval()
    x = torch.from_numpy(reference_inputs(predictor.image_size, predictor.in_channels, 2))
    names = {"input_names": ["inputs"], "output_names": ["probabilities"]}
    with warnings.catch_warnings():  # the TorchScript exporter says it is deprecated: the other one is the fallback
        warnings.simplefilter("ignore")
        try:  # a fraction of a second, against seconds for the torch.export-based exporter
            torch.onnx.export(graph, (x,), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={"inputs": {0: "n"}, "probabilities": {0: "n"}}, **names)
        except Exception as exc:  # noqa: BLE001 - an exporter without this model's ops, or removed
            log.info("TorchScript ONNX export failed (%s); trying torch.export", exc)
            batch = torch.export.Dim("n", min=1, max=1 << 16)
            torch.onnx.export(graph, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"x": {0: batch}}, verbose=False, **names)
    _rewrite(path)
    return Path(path)


def _rewrite(path: str | Path) -> None:
    """Apply ml.onnx_passes' exact rewrites to the file at ``path``; the file records how many Convs they cropped."""
    import onnx

    from ml.onnx_passes import crop_padding_taps

    model = onnx.load(str(path))
    cropped = crop_padding_taps(model)
    if cropped:
        model.metadata_props.add(key=CROPPED_KEY, value=str(cropped))
        onnx.save(model, str(path))


def _candidate(name: str, predictor: Predictor, out_dir: Path) -> Runtime:
    if name == "onnxruntime":
        return OnnxRuntime(export_onnx(predictor, out_dir / ONNX_FILE))
    return TorchGraphRuntime(predictor, name)


def _skip_reason(name: str, predictor: Predictor) -> str | None:
    if name not in CANDIDATES:
        return f"unknown runtime (known: eager, {', '.join(CANDIDATES)})"
    if predictor.device.type != "cpu":
        return f"built for CPU serving; {predictor.device.type} serves eager"
    if name == "bf16" and not native_bf16():
        return "this CPU has no native bf16 (avx512_bf16 or amx_bf16)"
    return None


def build(predictor: Predictor, out_dir: str | Path, candidates=DEFAULT_CANDIDATES, *,
          weights_sha256: str | None = None) -> dict:
    """Try each candidate on ``predictor``'s input shape; keep the fastest that agrees with eager.

    Writes the chosen runtime's file (model.onnx) into ``out_dir`` and returns the card's ``runtime``
    section: the runtime, why, and every candidate's measurement, rejection or error. Builds are
    remembered by ``weights_sha256`` (the same weights registered again reuse the measured choice).
    """
    out_dir, candidates = Path(out_dir), tuple(candidates)
    key = (weights_sha256, candidates)
    if weights_sha256 is not None and key in _BUILT:
        section, blob = _BUILT[key]
        if blob is not None:
            (out_dir / ONNX_FILE).write_bytes(blob)
        return dict(section)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forward workers run on one intra-op thread each
    try:
        section = _build(predictor, out_dir, candidates)
    finally:
        torch.set_num_threads(threads)
    if weights_sha256 is not None:
        path = out_dir / ONNX_FILE
        _BUILT[key] = (section, path.read_bytes() if section["file"] else None)
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    return section


def _build(predictor: Predictor, out_dir: Path, candidates: tuple) -> dict:
    reference = reference_inputs(predictor.image_size, predictor.in_channels)
    eager = EagerRuntime(predictor)
    expected = eager.probabilities(reference).astype(np.float64)
    measured: dict[str, dict] = {"eager": measure(eager, reference)}
    for name in candidates:
        skip = _skip_reason(name, predictor)
        if skip is not None:
            measured[name] = {"skipped": skip}
            continue
        tolerance = BF16_TOLERANCE if name == "bf16" else TOLERANCE
        try:
            t0 = time.perf_counter()
            runtime = _candidate(name, predictor, out_dir)
            check = agreement(runtime.probabilities(reference), expected)
            entry = {"build_s": round(time.perf_counter() - t0, 3), **check, "tolerance": tolerance}
            if getattr(runtime, "cropped_convs", 0):
                entry["cropped_convs"] = runtime.cropped_convs  # ml.onnx_passes.crop_padding_taps
            entry.update(measure(runtime, reference) if agrees(check, tolerance) else
                         {"rejected": "outputs differ from eager beyond the tolerance"})
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot be built: eager serves
            log.warning("runtime %s could not be built: %s", name, exc)
            entry = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        measured[name] = entry
    usable = {n: m for n, m in measured.items() if "score_ms" in m}
    chosen = min(usable, key=lambda n: usable[n]["score_ms"])
    if chosen != "onnxruntime":
        (out_dir / ONNX_FILE).unlink(missing_ok=True)
    section = {"name": chosen, "file": ONNX_FILE if chosen == "onnxruntime" else None,
               "reason": _reason(chosen, measured), "tolerance": TOLERANCE,
               "reference": {"inputs": len(reference), "shape": list(reference.shape[1:]), "dtype": "uint8"},
               "measured": measured, "threads": 1, "device": "cpu", "versions": _versions()}
    if section["file"]:
        section["sha256"] = hashlib.sha256((out_dir / ONNX_FILE).read_bytes()).hexdigest()
    return section


def _reason(chosen: str, measured: dict) -> str:
    score = "ms for one input alone plus one input of a full batch, one intra-op thread"
    eager = measured["eager"]["score_ms"]
    failed = [f"{n} {'could not be built' if 'error' in m else 'disagreed with eager'}"
              for n, m in measured.items() if "error" in m or "rejected" in m]
    tail = f"; {', '.join(failed)}" if failed else ""
    if chosen == "eager":
        return f"eager: {eager:g} {score}; no other runtime was faster and agreed with eager{tail}"
    m = measured[chosen]
    return (f"{chosen}: {m['score_ms']:g} against eager's {eager:g} {score}; top-1 identical to eager on "
            f"{REFERENCE_INPUTS} reference inputs, probabilities within {m['max_abs_diff']:.1e} "
            f"(tolerance {m['tolerance']:g}){tail}")


def _versions() -> dict:
    out = {"torch": str(torch.__version__)}
    try:
        import onnxruntime

        out["onnxruntime"] = str(onnxruntime.__version__)
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------ load

def load(predictor: Predictor, name: str | None, folder: str | Path) -> tuple[Runtime, str | None]:
    """The runtime a card names (its file, if any, in ``folder``: beside model.pt), or eager and why not.

    Nothing here unpickles: an ONNX file is protobuf, the weights came through Predictor (weights_only).
    """
    name = name or "eager"
    if predictor.device.type == "cuda":  # the card's runtime was chosen for CPUs
        runtime, why = cuda_runtime(predictor)
        return runtime, f"the card's {name} was chosen for CPUs; {why}"
    if name == "eager":
        return EagerRuntime(predictor), None
    skip = _skip_reason(name, predictor)
    if skip is not None:
        return EagerRuntime(predictor), f"{name}: {skip}"
    try:
        if name == "onnxruntime":
            path = Path(folder) / ONNX_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing")
            return OnnxRuntime(path), None
        runtime = TorchGraphRuntime(predictor, name)
        runtime.probabilities(reference_inputs(predictor.image_size, predictor.in_channels, 2))  # compiles now
        return runtime, None
    except Exception as exc:  # noqa: BLE001 - serve eager rather than not at all
        return EagerRuntime(predictor), f"{name}: {type(exc).__name__}: {exc}"


def top_k(probs: np.ndarray, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Probabilities [N,K] -> the ``k`` best (probabilities, class indices) per row, best first, as lists."""
    k = max(1, min(int(k), probs.shape[1]))
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, indices, axis=1).tolist(), indices.tolist()
