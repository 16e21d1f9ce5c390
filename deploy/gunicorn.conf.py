"""Production gunicorn config for Kiln's web tier (also used by `make run`).

gthread workers: each process serves several requests at once, which is what lets
/predict gather concurrent requests into one forward pass. Nothing heavy happens
in the master (no model, no connection, no CUDA): `preload_app` stays off.
"""
import multiprocessing
import os

bind = os.environ.get("KILN_BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", max(1, min(multiprocessing.cpu_count(), 4))))
worker_class = "gthread"
threads = int(os.environ.get("KILN_WEB_THREADS", 16))
# Long-polling log streams and large uploads need more than the default 30 s.
timeout = int(os.environ.get("KILN_WEB_TIMEOUT", 120))
graceful_timeout = 30
keepalive = 5
# Each web process listens on its own SO_REUSEPORT socket and the kernel spreads new connections across
# them. On one shared socket, whichever process woke first took the next connection: kept-alive clients
# piled onto one process (30 of 32 once) while the other idled. TCP only (a unix socket is one file).
# A plain bind of the same port still fails while Kiln holds it (`make run` checks that first).
reuse_port = not bind.startswith(("unix:", "fd://"))
preload_app = False
accesslog = os.environ.get("KILN_ACCESS_LOG", None)
errorlog = "-"
loglevel = os.environ.get("KILN_LOG_LEVEL", "info")

# Web processes run no forward passes: those happen in the host's one forward process
# (web/forward.py), whose KILN_TORCH_THREADS workers (default: one per core) each use a
# single intra-op thread. Several processes each spinning every core's worth of OpenMP
# threads collapse throughput on small machines, so nothing here starts a pool of its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_home = os.path.abspath(os.environ.get("KILN_HOME", "var"))

# gunicorn's control socket (gunicornc) defaults to one path per user (~/.gunicorn/gunicorn.ctl):
# two Kilns on one machine would share it and stopping one would remove the other's. One per home.
control_socket = os.path.join(_home, "gunicorn.ctl")
if len(control_socket) >= 100:  # a unix socket path holds 108 bytes
    control_socket_disable = True

# prometheus-client multiprocess mode: every worker writes its samples here.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(_home, "prometheus")


def on_starting(server):
    """Start each run with an empty multiprocess directory (stale files double-count)."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the multiprocess registry."""
    try:
        from prometheus_client import multiprocess
    except ImportError:  # pragma: no cover
        return
    multiprocess.mark_process_dead(worker.pid)
