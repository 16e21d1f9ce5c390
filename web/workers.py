"""GET /v1/workers (read scope): the workers that advertise themselves, with their GPUs.

Each worker's main process refreshes its row every heartbeat (worker.workers.Advertiser);
``live`` is false once a worker has missed heartbeats for two lease timeouts.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from web.context import kiln, settings
from web.schemas import doc
from worker.workers import list_workers, live_within_s

bp = Blueprint("workers", __name__, url_prefix="/v1/workers")


@bp.get("")
@doc(responses={200: ("every worker that advertised itself, by name: GPUs, free GPUs, pool slots, last "
                      "heartbeat and whether it is live", "WorkerList")})
def list_all():
    """Every advertised worker: its GPUs and how many are free now, its pool slots, whether it is live."""
    return jsonify({"workers": list_workers(kiln().engine, live_within_s(settings()))})
