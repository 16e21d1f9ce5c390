"""Celery entry module: ``celery -A worker.celery_main worker --pool prefork``.

Reads Settings from the environment (the one place it does, for the worker), imports
torch and ml in the parent so every forked process starts warm, and runs one pool child
per visible GPU (1 on a CPU machine), each pinned to its own device. The pool child holds the
job's lease and forks the job process (worker.jobproc), which gets the clean CUDA context; the
pool child itself never touches the GPU, so it stays warm across jobs (replacing it after each
job made a job wait for a new child now and then: 2-4 s).
"""
from __future__ import annotations

import logging
import os
import subprocess

from celery import signals

from configs import Settings
from worker import db
from worker.app import make_celery
from worker.jobrun import install_log_factory

log = logging.getLogger("kiln.worker")


def visible_gpus() -> list[str]:
    """GPU ids this worker may use, without initialising CUDA in the parent (children fork later)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


settings = Settings.from_env()
install_log_factory()
if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(processName)s %(levelname)s [job %(job_id)s] %(name)s: %(message)s")
GPUS = visible_gpus()
CONCURRENCY = max(1, len(GPUS))
app = make_celery(settings)
app.conf.update(worker_concurrency=CONCURRENCY, worker_pool="prefork")

# Warm parent: children fork with torch and the training code already imported (~4 s saved per job).
def _warm_imports() -> None:
    """What a first training run would import lazily (measured: ~2 s of a digits job's first step)."""
    import PIL.Image  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import torchvision  # noqa: F401

    import ml.data  # noqa: F401
    import ml.train  # noqa: F401


import torch  # noqa: E402

_warm_imports()

_reconciler = None


@signals.worker_process_init.connect
def _child_init(**_):
    """Light per-child setup: fresh DB pools, own GPU, deliberate thread count."""
    from billiard.process import current_process

    from worker import tasks

    db.after_fork()
    tasks.reset_context()
    index = getattr(current_process(), "index", 0) or 0
    if GPUS:
        # before any CUDA call in this child: it sees exactly one device, as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = GPUS[index % len(GPUS)]
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // CONCURRENCY)
    torch.set_num_threads(threads)
    os.environ.setdefault("KILN_TORCH_THREADS", str(threads))  # ml keeps our choice


@signals.worker_ready.connect
def _start_reconciler(sender=None, **_):
    """The embedded default runs no celery beat: reconcile from a thread in the main process."""
    global _reconciler
    from worker.reconcile import Reconciler, reconcile
    from worker.tasks import context

    ctx = context(app)
    client = ctx.broker_client()
    _reconciler = Reconciler(lambda: reconcile(ctx.store, ctx.send, settings, broker=client),
                             settings.reconcile_every_s)
    _reconciler.start()
    log.info("worker ready: %d process(es), GPUs %s, reconcile every %ss", CONCURRENCY, GPUS or "none",
             settings.reconcile_every_s)


@signals.worker_shutdown.connect
def _stop_reconciler(**_):
    if _reconciler is not None:
        _reconciler.stop()
