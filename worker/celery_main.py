"""Celery entry module: ``celery -A worker.celery_main worker --pool prefork``.

Reads Settings from the environment (the one place it does, for the worker), imports
torch and ml in the parent so every forked process starts warm, and runs one pool child
per visible GPU (1 on a CPU machine). No pool child owns a GPU: before it leases a job it
reserves the GPUs the job needs from the host's allocator (worker.gpus: 1, or
training.processes, or all of them) and the job process it forks (worker.jobproc) sees exactly
those; the pool child itself never touches the GPU, so it stays warm across jobs (replacing it
after each job made a job wait for a new child now and then: 2-4 s). The main process
advertises the worker (worker.workers: GPUs, free GPUs, slots) every heartbeat.
"""
from __future__ import annotations

import logging
import os
import socket

from celery import signals

from configs import Settings
from worker import db, gpus
from worker.app import make_celery
from worker.jobrun import install_log_factory

log = logging.getLogger("kiln.worker")


settings = Settings.from_env()
install_log_factory()
if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(processName)s %(levelname)s [job %(job_id)s] %(name)s: %(message)s")
GPUS = gpus.visible_gpus()
CONCURRENCY = max(1, len(GPUS))  # one pool child per GPU; a job of N GPUs leaves N - 1 of them waiting
ALLOCATOR = gpus.configure(GPUS, settings)  # before the fork: every pool child shares the host's lock files
WORKER_NAME = settings.worker_name or socket.gethostname()
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
_advertiser = None


@signals.worker_process_init.connect
def _child_init(**_):
    """Light per-child setup: fresh DB pools, deliberate thread count (GPUs are reserved per job)."""
    from worker import tasks

    db.after_fork()
    tasks.reset_context()
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // CONCURRENCY)
    torch.set_num_threads(threads)
    os.environ.setdefault("KILN_TORCH_THREADS", str(threads))  # ml keeps our choice


@signals.worker_ready.connect
def _start_reconciler(sender=None, **_):
    """The embedded default runs no celery beat: reconcile from a thread in the main process; a
    second thread advertises this worker (worker.workers.Advertiser)."""
    global _reconciler, _advertiser
    from worker.reconcile import Reconciler, reconcile
    from worker.retention import sweep as retention_sweep
    from worker.sweeps import advance_sweeps
    from worker.tasks import context
    from worker.workers import Advertiser

    ctx = context(app)
    client = ctx.broker_client()
    _reconciler = Reconciler(lambda: {**reconcile(ctx.store, ctx.send, settings, broker=client),
                                      **advance_sweeps(ctx.store),  # and the sweeps' controller pass
                                      **retention_sweep(settings, engine=ctx.store.engine, storage=ctx.storage)},
                             settings.reconcile_every_s)
    _reconciler.start()
    slots = getattr(getattr(sender, "controller", None), "concurrency", None) or CONCURRENCY  # --concurrency wins
    _advertiser = Advertiser(ctx.store.engine, WORKER_NAME, GPUS, slots, lambda: len(ALLOCATOR.free_ids()),
                             settings.heartbeat_s, info={"torch": torch.__version__, "cuda": torch.version.cuda})
    _advertiser.start()
    log.info("worker ready: %d process(es), GPUs %s, reconcile every %ss", CONCURRENCY, GPUS or "none",
             settings.reconcile_every_s)


@signals.worker_shutdown.connect
def _stop_reconciler(**_):
    if _reconciler is not None:
        _reconciler.stop()
    if _advertiser is not None:
        _advertiser.stop()
