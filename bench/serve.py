"""Serving benchmark: Kiln's /predict against TorchServe 0.12 (and a textbook Flask baseline), one load generator.

Same untrained resnet18 and 32x32 PNGs everywhere; docs/serving.md says what each server runs and how to read it.
    python bench/serve.py [--duration 6] [--rounds 3] [--clients 1,8,32] [--servers kiln,torchserve[,baseline]]
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
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

from bench import loadgen, torchserve_peer  # noqa: E402

BASELINE_APP = textwrap.dedent('''
    import io, os
    import torch
    from flask import Flask, jsonify, request
    from PIL import Image
    from ml.inference import Predictor

    torch.set_num_threads(1)
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
    """A server process group started here; ``stop`` ends it and every process it started."""

    def __init__(self, label: str, argv: list[str], env: dict, port: int, path: str, log: Path, cwd: Path = ROOT):
        self.label, self.port, self.path, self.log = label, port, path, log
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, body: bytes, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.log.read_text()[-2000:]}")
            try:
                status, _ = request(self.port, self.path, body)
                if status == 200:
                    for _ in range(50):  # every worker loads its model on its first requests: warm them all
                        request(self.port, self.path, body)
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} not ready in {timeout:g} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 20 s, then SIGKILL to any descendant that left the group."""
        tree = _tree(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in tree - {self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def request(port: int, path: str, body: bytes):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "image/png"})
        resp = c.getresponse()
        return resp.status, resp.read()
    finally:
        c.close()


def _tree(root: int) -> set[int]:
    """``root`` and every live descendant (a forward process in a session of its own included)."""
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return seen


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and every live descendant."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def load(server: Server, bodies: list[bytes], clients: int, duration: float) -> dict:
    """``clients`` closed-loop clients for ``duration`` s: loadgen's figures plus the elapsed time and the
    CPU seconds each side spent."""
    server_cpu, own, t0 = _tree_cpu(server.proc.pid), os.times(), time.perf_counter()
    out = loadgen.run(server.port, loadgen.encode_requests(server.path, bodies), clients, duration)
    now = os.times()
    out["elapsed"] = time.perf_counter() - t0
    out["server_cpu"] = _tree_cpu(server.proc.pid) - server_cpu
    out["client_cpu"] = (now.user + now.system) - (own.user + own.system)
    return out


def combine(slices: list[dict]) -> dict:
    """One cell from its slices: every latency pooled, CPU per request over all of them."""
    out = loadgen.summary([x for s in slices for x in s["latencies"]], sum(s["elapsed"] for s in slices),
                          sum(s["errors"] for s in slices))
    done = max(1, out["n"])
    out["server_cpu_ms"] = 1000 * sum(s["server_cpu"] for s in slices) / done
    out["client_cpu_ms"] = 1000 * sum(s["client_cpu"] for s in slices) / done
    return out


def kiln_server(tmp: Path, ckpt: Path, base_env: dict, extra: dict) -> tuple[Server, dict]:
    """Kiln on a fresh home with the checkpoint registered as bench@production; (server, its card's runtime)."""
    from configs import Settings
    from worker.db import migrate
    from worker.registry import Registry

    port = free_port()
    settings = Settings.for_home(tmp / "var", auth_enabled=False)
    migrate(settings)
    registry = Registry.from_settings(settings)
    version = registry.register_checkpoint("bench", ckpt)  # measures and builds its runtime, as POST /v1/models does
    registry.set_alias("bench", "production", version["version"])
    runtime = registry.resolve_model("bench@production")["card"]["runtime"]
    registry.engine.dispose()
    env = {**base_env, **settings.env(), "KILN_HOME": str(settings.home_path), "KILN_BIND": f"127.0.0.1:{port}",
           "WEB_CONCURRENCY": "2", "KILN_WEB_THREADS": "16", **extra}
    label = f"kiln ({env['WEB_CONCURRENCY']} gthread x {env['KILN_WEB_THREADS']}, {runtime['name']})"
    return Server(label, [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"),
                          "web.wsgi:app"], env, port, "/predict?model=bench@production", tmp / "kiln.log"), runtime


def torchserve_server(tmp: Path, ckpt: Path, base_env: dict) -> Server | str:
    """TorchServe with the same weights, or why it is skipped."""
    why = torchserve_peer.unavailable()
    if why is not None:
        return why
    try:
        bin_dir = torchserve_peer.install()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"TorchServe could not be installed: {exc}"
    ports = (free_port(), free_port(), free_port())
    argv, env = torchserve_peer.prepare(bin_dir, tmp / "torchserve", ckpt, ports)
    label = (f"torchserve {torchserve_peer.VERSION} ({torchserve_peer.WORKERS} workers x 1 thread, batch "
             f"{torchserve_peer.BATCH_SIZE} / {torchserve_peer.MAX_BATCH_DELAY_MS} ms)")
    return Server(label, argv, {**base_env, **env}, ports[0], "/predictions/bench", tmp / "torchserve.log",
                  cwd=tmp / "torchserve")


def baseline_server(tmp: Path, ckpt: Path, base_env: dict) -> Server:
    (tmp / "baseline_app.py").write_text(BASELINE_APP)
    port = free_port()
    env = {**base_env, "PYTHONPATH": f"{ROOT}:{tmp}", "BASELINE_CKPT": str(ckpt), "OMP_NUM_THREADS": "1"}
    return Server("baseline flask (2 sync, 1 thread each)", [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "sync",
                  "-b", f"127.0.0.1:{port}", "--timeout", "120", "baseline_app:app"], env, port, "/predict",
                  tmp / "baseline.log")


# ---------------------------------------------------------------- report

def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"


def report(results: dict[str, dict[int, dict]], levels: list[int], skipped: list[str], args, header: str) -> None:
    print(f"\n{header}; {args.duration:g} s per cell in {args.rounds} slices taken in turn; servers and load "
          "generator share the machine")
    for why in skipped:
        print(f"skipped: {why}")
    print(f"{'server':58s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s} "
          f"{'server CPU ms/req':>17s} {'client CPU ms/req':>17s}")
    for label, row in results.items():
        for c in levels:
            r = row[c]
            print(f"{label:58s} {c:7d} {r['rps']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:6d} "
                  f"{r['server_cpu_ms']:17.2f} {r['client_cpu_ms']:17.2f}")
    kiln = next(v for k, v in results.items() if k.startswith("kiln"))
    peer = next((v for k, v in results.items() if k.startswith("torchserve")), None)
    if peer is None:
        return
    print(f"\n{'kiln / torchserve':26s} {'clients':>7s} {'req/s':>8s} {'p50':>8s} {'p99':>8s} {'CPU/req':>8s}")
    for c in levels:
        k, t = kiln[c], peer[c]
        print(f"{'':26s} {c:7d} {k['rps'] / t['rps']:8.2f} {k['p50'] / t['p50']:8.2f} {k['p99'] / t['p99']:8.2f} "
              f"{k['server_cpu_ms'] / t['server_cpu_ms']:8.2f}")
    checks = []
    hi = max(levels)
    if 32 in levels or hi >= 8:
        checks += [(f"req/s at {hi} clients: kiln / torchserve", kiln[hi]["rps"] / peer[hi]["rps"], ">= 1.5"),
                   (f"p99 at {hi} clients: kiln / torchserve", kiln[hi]["p99"] / peer[hi]["p99"], "< 1.0")]
    if 8 in levels and hi != 8:
        checks.append(("req/s at 8 clients: kiln / torchserve", kiln[8]["rps"] / peer[8]["rps"], ">= 1.5"))
    if 1 in levels:
        checks.append(("p50 at 1 client: kiln / torchserve", kiln[1]["p50"] / peer[1]["p50"], "<= 0.5"))
    print()
    for name, value, target in checks:
        op, bound = target.split()
        ok = {">=": value >= float(bound), "<": value < float(bound), "<=": value <= float(bound)}[op]
        print(f"{name:44s} {value:8.2f}  target {target:7s} {'met' if ok else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per (server, clients) cell")
    ap.add_argument("--rounds", type=int, default=3,
                    help="slices per cell; servers alternate slice by slice, so load from elsewhere hits all alike")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--servers", default="kiln,torchserve", help="any of kiln, torchserve, baseline (kiln always)")
    ap.add_argument("--kiln-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for Kiln's server (e.g. WEB_CONCURRENCY=4, KILN_FORWARD_WORKERS=2)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    wanted = set(args.servers.split(",")) | {"kiln"}
    header = f"resnet18, 32x32 PNG, {machine()}"
    tmp = Path(tempfile.mkdtemp(prefix="kbench"))
    bodies = [png_bytes(i) for i in range(64)]
    servers: list[Server] = []
    skipped: list[str] = []
    results: dict[str, dict[int, dict]] = {}
    try:
        ckpt = tmp / "resnet18.pt"
        write_checkpoint(ckpt)
        base_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        kiln, runtime = kiln_server(tmp, ckpt, base_env, dict(kv.split("=", 1) for kv in args.kiln_env))
        servers.append(kiln)
        print(f"kiln serves with {runtime['name']}: {runtime.get('reason', '')}", flush=True)
        if "torchserve" in wanted:
            peer = torchserve_server(tmp, ckpt, base_env)
            (servers.append if isinstance(peer, Server) else skipped.append)(peer)
        if "baseline" in wanted:
            servers.append(baseline_server(tmp, ckpt, base_env))
        for srv in servers:
            srv.wait_ready(bodies[0])
        for c in levels:  # each cell in slices, the servers taking turns slice by slice
            slices: dict[str, list[dict]] = {srv.label: [] for srv in servers}
            for _ in range(args.rounds):
                for srv in servers:
                    slices[srv.label].append(load(srv, bodies, c, args.duration / args.rounds))
            for srv in servers:
                results.setdefault(srv.label, {})[c] = combine(slices[srv.label])
                print(f"  {srv.label[:40]:40s} {c:3d} clients: {results[srv.label][c]['rps']:7.1f} req/s", flush=True)
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, levels, skipped, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
