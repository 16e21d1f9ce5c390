"""Prometheus /metrics: HTTP traffic, /predict batching, and job/worker state.

Request counters and histograms live in prometheus-client's multiprocess mode when
PROMETHEUS_MULTIPROC_DIR is set (gunicorn's config sets it under KILN_HOME), so
every gunicorn worker's samples add up; without it they use the default registry.
Job counts, queue depth, job durations and worker heartbeats are read at scrape
time through the Kiln facade (a few small queries), cached for ``SCRAPE_CACHE_S``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone

from flask import Blueprint, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
SCRAPE_CACHE_S = 5.0
RECENT_JOBS = 200  # durations and heartbeats come from the newest jobs, not the whole table
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)

HTTP_REQUESTS = Counter("kiln_http_requests_total", "HTTP requests by route (URL rule) and status.",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("kiln_http_request_duration_seconds", "Time to produce the response, by route.",
                         ["method", "route"],
                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
PREDICT_BATCH = Histogram("kiln_predict_batch_size", "Inputs per /predict forward pass.",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
PREDICT_WAIT = Histogram("kiln_predict_queue_wait_seconds", "Time a /predict input waited for its batch.",
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))


def observe_batch(size: int, wait_s: float) -> None:
    """Record one /predict forward pass: inputs in the batch and the oldest input's queue wait."""
    PREDICT_BATCH.observe(size)
    PREDICT_WAIT.observe(max(0.0, wait_s))


def observe_queue_wait(wait_s: float) -> None:
    """Record one input's queue wait (when the batcher reports waits per input)."""
    PREDICT_WAIT.observe(max(0.0, wait_s))


# ------------------------------------------------------------------ HTTP
def _start_timer():
    g.kiln_t0 = time.perf_counter()


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_children: dict[tuple, tuple] = {}  # (method, route, status) -> (counter child, histogram child)


def _record(response):
    t0 = g.get("kiln_t0")
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    method = request.method if request.method in _METHODS else "OTHER"  # bounded label values
    key = (method, route, response.status_code)
    pair = _children.get(key)
    if pair is None:  # labels() validates and locks on every call: look each child up once
        pair = _children[key] = (HTTP_REQUESTS.labels(key[0], route, str(key[2])),
                                 HTTP_LATENCY.labels(key[0], route))
    pair[0].inc()
    if t0 is not None:
        pair[1].observe(time.perf_counter() - t0)
    return response


# ------------------------------------------------------------------ scrape-time
def _parse_time(value) -> float | None:
    if not value:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _job_counts(kiln) -> dict[str, int]:
    counts = getattr(kiln, "job_counts", None)
    if counts is not None:
        found = counts()
        return {s: int(found.get(s, 0)) for s in STATES}
    return {s: int(kiln.list_jobs(status=s, limit=1)["total"]) for s in STATES}


def collect_service(kiln) -> list:
    """Metric families read from the store/broker: jobs by state, queue depth, durations, heartbeats."""
    now = time.time()
    counts = _job_counts(kiln)
    jobs = GaugeMetricFamily("kiln_jobs", "Jobs by state.", labels=["state"])
    for state, n in counts.items():
        jobs.add_metric([state], n)
    depth_fn = getattr(kiln, "queue_depth", None)
    depth = depth_fn() if depth_fn is not None else counts["queued"]
    queue = GaugeMetricFamily("kiln_queue_depth", "Jobs waiting for a worker (broker queue length).",
                              value=float(depth))

    recent = kiln.list_jobs(limit=RECENT_JOBS)["jobs"]
    per_kind: dict[str, list[float]] = {}
    beats: dict[str, float] = {}
    for job in recent:
        start, end = _parse_time(job.get("started_at")), _parse_time(job.get("finished_at"))
        if job.get("status") in FINISHED and start is not None and end is not None:
            per_kind.setdefault(job.get("kind") or "train", []).append(max(0.0, end - start))
        # A job's last sign of life from its worker: its heartbeat, else its last progress update.
        worker = job.get("worker")
        beat = _parse_time(job.get("heartbeat_at") or job.get("updated_at"))
        if worker and beat is not None:
            beats[worker] = max(beats.get(worker, 0.0), beat)
    heartbeats_fn = getattr(kiln, "worker_heartbeats", None)  # exact: max(heartbeat_at) per worker
    if heartbeats_fn is not None:
        beats = {w: t for w, t in ((w, _parse_time(v)) for w, v in heartbeats_fn().items()) if t is not None}
    durations = GaugeHistogramMetricFamily(
        "kiln_job_duration_seconds", f"Run time of the newest {RECENT_JOBS} finished jobs, by kind.",
        labels=["kind"])
    for kind, values in per_kind.items():
        buckets = [(str(b), float(sum(v <= b for v in values))) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        durations.add_metric([kind], buckets, gsum_value=sum(values))
    heartbeat = GaugeMetricFamily("kiln_worker_heartbeat_age_seconds",
                                  "Seconds since each worker's newest job heartbeat.", labels=["worker"])
    for worker, beat in sorted(beats.items()):
        heartbeat.add_metric([worker], max(0.0, now - beat))
    return [jobs, queue, durations, heartbeat]


class ServiceCollector:
    """A collector over the app's Kiln facade, with a short cache so scrapes stay cheap."""

    def __init__(self, app):
        self.app = app
        self._lock = threading.Lock()
        self._cached: tuple[float, list] = (0.0, [])

    def collect(self):
        with self._lock:
            at, families = self._cached
            if time.monotonic() - at > SCRAPE_CACHE_S:
                up = 1.0
                try:
                    families = collect_service(self.app.extensions["kiln"])
                except Exception:  # a down store must not take /metrics down with it
                    log.exception("collecting job metrics failed")
                    families, up = [], 0.0
                families = families + [GaugeMetricFamily(
                    "kiln_store_up", "1 when the last scrape could read the job store.", value=up)]
                self._cached = (time.monotonic(), families)
        yield from families


def _process_registry():
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


@bp.get("/metrics")
def metrics():
    """Prometheus text format: this tier's process metrics plus the service's job metrics."""
    service = current_app.extensions["kiln.metrics"]
    body = generate_latest(_process_registry()) + generate_latest(service)
    return Response(body, content_type=CONTENT_TYPE_LATEST)


def init_app(app) -> None:
    """Time every request, count it by route and status, and serve /metrics."""
    service = CollectorRegistry(auto_describe=False)
    service.register(ServiceCollector(app))
    app.extensions["kiln.metrics"] = service
    app.before_request(_start_timer)
    app.after_request(_record)
    app.register_blueprint(bp)
