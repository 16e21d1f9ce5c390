"""Serving benchmark: Kiln's /predict against a textbook Flask baseline and the in-process ceiling.

resnet18 (untrained, written via ml.checkpoint; no downloads) on 32x32 RGB PNGs.
  (a) baseline: minimal Flask app, model loaded once, one image per forward, gunicorn
      with 2 sync workers; once with torch's default threads, once with 1 thread/worker
  (b) Kiln: /predict under deploy/gunicorn.conf.py (gthread, dynamic batching)
  (c) ceiling: Predictor.infer at its best batch size, no HTTP
Loopback only, bounded (about DURATION_S per cell), cleans up after itself.
    python bench/serve.py [--duration 4] [--clients 1,8,32]
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402

BASELINE_APP = textwrap.dedent('''
    import io, os
    import torch
    from flask import Flask, jsonify, request
    from PIL import Image
    from ml.inference import Predictor

    if os.environ.get("BASELINE_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["BASELINE_TORCH_THREADS"]))
    app = Flask(__name__)
    predictor = Predictor.from_checkpoint(os.environ["BASELINE_CKPT"])

    @app.post("/predict")
    def predict():
        image = Image.open(io.BytesIO(request.get_data()))
        return jsonify({"predictions": [predictor.predict(image)]})
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def write_checkpoint(path: Path) -> None:
    """An untrained resnet18 for 32x32 RGB, 10 classes, in Kiln's checkpoint format."""
    import torch

    from configs import load_config, to_dict
    from ml.checkpoint import save_checkpoint
    from ml.models import build_model

    cfg = load_config({"model": {"name": "resnet18", "num_classes": 10, "in_channels": 3},
                       "data": {"dataset": "fake", "image_size": 32}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    config = to_dict(cfg)
    save_checkpoint(path, {"format": "kiln.checkpoint/1", "model": model.state_dict(), "config": config,
                           "classes": [str(i) for i in range(10)], "image_size": 32, "in_channels": 3,
                           "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "epoch": 0, "step": 0,
                           "metrics": {}, "best": {}})


# ---------------------------------------------------------------- servers

class Server:
    def __init__(self, argv: list[str], env: dict, port: int, log: Path):
        self.port, self.log = port, log
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, path: str, body: bytes, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                status, _ = request(self.port, path, body)
                if status == 200:
                    # every worker loads its model on its first request: warm them all
                    for _ in range(20):
                        request(self.port, path, body)
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def request(port: int, path: str, body: bytes, conn: http.client.HTTPConnection | None = None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, body=body, headers={"Content-Type": "image/png"})
    resp = c.getresponse()
    data = resp.read()
    if resp.getheader("Connection", "").lower() == "close":
        c.close()
    if conn is None:
        c.close()
    return resp.status, data


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and every live descendant."""
    tick, total, todo, seen = os.sysconf("SC_CLK_TCK"), 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def load(server: "Server", path: str, bodies: list[bytes], clients: int, duration: float) -> dict:
    """``clients`` closed-loop clients for ``duration`` s, plus the CPU each side spent per request."""
    server_cpu, own = _tree_cpu(server.proc.pid), os.times()
    out = loadgen.run(server.port, loadgen.encode_requests(path, bodies), clients, duration)
    done = max(1, out["n"])
    now = os.times()
    out["server_cpu_ms"] = 1000 * (_tree_cpu(server.proc.pid) - server_cpu) / done
    out["client_cpu_ms"] = 1000 * ((now.user + now.system) - (own.user + own.system)) / done
    return out


def ceiling(ckpt: Path, threads: int, duration: float = 1.5) -> dict:
    """Images/s of Predictor.infer at its best batch size, in this process."""
    import torch

    from ml.inference import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.from_checkpoint(ckpt)
    best = {"rps": 0.0}
    for bs in (1, 8, 32, 64, 128):
        x = predictor.preprocess([torch.rand(3, 32, 32) for _ in range(bs)])
        predictor.infer(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            predictor.infer(x)
            n += bs
        rps = n / (time.perf_counter() - t0)
        if rps > best["rps"]:
            best = {"rps": rps, "batch_size": bs}
    return best


def kiln_home(home: Path, ckpt: Path, port: int, env: dict) -> dict:
    """A Kiln home (migrated store, checkpoint registered as bench@production) and its server env."""
    from configs import Settings
    from worker.db import migrate
    from worker.registry import Registry

    settings = Settings.for_home(home, auth_enabled=False)
    migrate(settings)
    registry = Registry.from_settings(settings)
    registry.register_checkpoint("bench", ckpt)
    registry.set_alias("bench", "production", 1)
    registry.engine.dispose()
    return {**env, **settings.env(), "KILN_HOME": str(settings.home_path), "KILN_BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": env.get("WEB_CONCURRENCY", "2"), "KILN_WEB_THREADS": env.get("KILN_WEB_THREADS", "16")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per (server, clients) cell")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--kiln-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for Kiln's server (e.g. WEB_CONCURRENCY=4, KILN_FORWARD_WORKERS=2)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="kbench"))
    bodies = [png_bytes(i) for i in range(64)]
    servers: list[Server] = []
    results: dict[str, dict[int, dict]] = {}
    try:
        ckpt = tmp / "resnet18.pt"
        write_checkpoint(ckpt)
        (tmp / "baseline_app.py").write_text(BASELINE_APP)
        base_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp}", "BASELINE_CKPT": str(ckpt)}
        gunicorn = [sys.executable, "-m", "gunicorn"]
        variants = {
            "baseline (2 sync, default threads)": {},
            "baseline (2 sync, 1 thread/worker)": {"BASELINE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"},
        }
        for label, extra in variants.items():
            port = free_port()
            srv = Server(gunicorn + ["-w", "2", "-k", "sync", "-b", f"127.0.0.1:{port}", "--timeout", "120",
                                     "baseline_app:app"], {**base_env, **extra}, port, tmp / f"{len(servers)}.log")
            servers.append(srv)
            srv.wait_ready("/predict", bodies[0])
            results[label] = {c: load(srv, "/predict", bodies, c, args.duration) for c in levels}
            srv.stop()

        port = free_port()
        env = kiln_home(tmp / "var", ckpt, port, base_env)
        env.update(dict(kv.split("=", 1) for kv in args.kiln_env))
        srv = Server(gunicorn + ["-c", str(ROOT / "deploy/gunicorn.conf.py"), "web.wsgi:app"], env, port,
                     tmp / "kiln.log")
        servers.append(srv)
        path = "/predict?model=bench@production"
        srv.wait_ready(path, bodies[0])
        from configs import Settings
        from web.serving.web_app import forward_workers

        forwards = forward_workers(Settings.from_env(env))
        label = (f"kiln /predict ({env['WEB_CONCURRENCY']} gthread x {env.get('KILN_WEB_THREADS', 16)}, "
                 f"{forwards} fwd thr)")
        results[label] = {c: load(srv, path, bodies, c, args.duration) for c in levels}
        srv.stop()

        ceil = ceiling(ckpt, threads=cores)
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nresnet18, 32x32 PNG, {cores} CPU cores, {args.duration:g} s per cell")
    print(f"{'server':44s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s} "
          f"{'server CPU ms/req':>17s} {'client CPU ms/req':>17s}")
    for label, row in results.items():
        for c, r in row.items():
            print(f"{label:44s} {c:7d} {r['rps']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:6d} "
                  f"{r.get('server_cpu_ms', float('nan')):17.2f} {r.get('client_cpu_ms', float('nan')):17.2f}")
    print(f"{'ceiling: Predictor.infer, batch ' + str(ceil['batch_size']):44s} {'-':>7s} {ceil['rps']:8.1f}")
    kiln = results[label]
    baselines = [v for k, v in results.items() if k.startswith("baseline")]
    hi = max(levels)
    best_hi = max(b[hi]["rps"] for b in baselines)
    checks = [(f"kiln/best baseline req/s at {hi} clients", kiln[hi]["rps"] / best_hi, ">= 3.0",
               kiln[hi]["rps"] >= 3 * best_hi),
              (f"kiln/ceiling at {hi} clients", kiln[hi]["rps"] / ceil["rps"], ">= 0.4",
               kiln[hi]["rps"] >= 0.4 * ceil["rps"]),
              (f"kiln p99 at {hi} clients (ms)", kiln[hi]["p99"], "< 150", kiln[hi]["p99"] < 150)]
    if 1 in levels:
        best_p50 = min(b[1]["p50"] for b in baselines)
        checks.append(("kiln p50 / best baseline p50 at 1 client", kiln[1]["p50"] / best_p50, "<= 1.2",
                       kiln[1]["p50"] <= 1.2 * best_p50))
    print()
    for name, value, target, ok in checks:
        print(f"{name:44s} {value:8.2f}  target {target:7s} {'ok' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
