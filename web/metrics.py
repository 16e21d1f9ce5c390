"""Prometheus /metrics: HTTP traffic, /predict batching, and job/worker state.

Request counters and histograms live in prometheus-client's multiprocess mode when
PROMETHEUS_MULTIPROC_DIR is set (gunicorn's config sets it under KILN_HOME), so
every gunicorn worker's samples add up; without it they use the default registry.
Job counts, the broker's queue depth, job durations and worker heartbeats are read
at scrape time through the Kiln facade (a few small queries), cached for ``SCRAPE_CACHE_S``.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from flask import Blueprint, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

from configs.names import TERMINAL_STATES
from web.context import kiln
from worker.clock import parse_iso

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

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


PREDICT_INPUTS = Counter("kiln_predict_inputs_total", "Inputs /predict classified, by model version and runtime.",
                         ["model", "version", "runtime"])


def observe_inputs(model: str, version: int, runtime: str, n: int) -> None:
    """Record ``n`` inputs classified by one model version on its serving runtime."""
    PREDICT_INPUTS.labels(model, str(version), runtime).inc(n)


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
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    record_request(request.method, route, response.status_code, g.get("kiln_t0"))
    return response


def record_request(method: str, route: str, status: int, t0: float | None) -> None:
    """Count one request by method, route (URL rule) and status, and time it from ``t0`` (perf_counter)."""
    method = method if method in _METHODS else "OTHER"  # bounded label values
    key = (method, route, status)
    pair = _children.get(key)
    if pair is None:  # labels() validates and locks on every call: look each child up once
        pair = _children[key] = (HTTP_REQUESTS.labels(method, route, str(status)),
                                 HTTP_LATENCY.labels(method, route))
    pair[0].inc()
    if t0 is not None:
        pair[1].observe(time.perf_counter() - t0)


# ------------------------------------------------------------------ scrape-time
def _timestamp(text: str | None) -> float | None:
    at = parse_iso(text)
    return None if at is None else at.timestamp()


def collect_service(kiln) -> list:
    """Metric families read through the facade: jobs by state, queue depth, durations, heartbeats."""
    now = time.time()
    jobs = GaugeMetricFamily("kiln_jobs", "Jobs by state.", labels=["state"])
    for state, n in kiln.job_counts().items():
        jobs.add_metric([state], n)
    families = [jobs]
    depth = kiln.queue_depth()
    if depth is not None:  # absent while the broker cannot be read (/ready names it)
        families.append(GaugeMetricFamily("kiln_queue_depth", "Jobs whose message waits in the broker's queue.",
                                          value=float(depth)))
    per_kind: dict[str, list[float]] = {}
    for job in kiln.list_jobs(limit=RECENT_JOBS)["jobs"]:
        start, end = _timestamp(job.get("started_at")), _timestamp(job.get("finished_at"))
        if job["status"] in TERMINAL_STATES and start is not None and end is not None:
            per_kind.setdefault(job["kind"], []).append(max(0.0, end - start))
    durations = GaugeHistogramMetricFamily(
        "kiln_job_duration_seconds", f"Run time of the newest {RECENT_JOBS} finished jobs, by kind.",
        labels=["kind"])
    for kind, values in per_kind.items():
        buckets = [(str(b), float(sum(v <= b for v in values))) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        durations.add_metric([kind], buckets, gsum_value=sum(values))
    heartbeat = GaugeMetricFamily("kiln_worker_heartbeat_age_seconds",
                                  "Seconds since each worker's newest job heartbeat.", labels=["worker"])
    for worker, beat in sorted(kiln.worker_heartbeats().items()):
        heartbeat.add_metric([worker], max(0.0, now - beat.timestamp()))
    return families + [durations, heartbeat]


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
                    families = collect_service(kiln(self.app))
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
