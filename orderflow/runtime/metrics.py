"""What a function process has done so far, and how it shows up in ``nats micro``.

Each function process registers as a NATS micro service (``orderflow-<name>``)
with one endpoint, ``messages``, whose stats are the worker's counters:
``num_requests`` counts processed messages, ``num_errors`` failed attempts,
``processing_time`` the time spent handling them; ``data`` adds retried and
dead-lettered counts and the last error. So ``nats micro ls`` lists every
running instance and ``nats micro stats orderflow-payment`` its work, with
nothing but the NATS micro protocol. A request to the endpoint subject
(``orderflow.<name>.messages``) answers with the same counters as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from orderflow import subjects

VERSION = "0.1.0"


@dataclass
class Counters:
    processed: int = 0  # handled and acked, outputs published
    failed: int = 0  # attempts that raised (each retry or final failure)
    retried: int = 0  # handed back with a delay
    dead_lettered: int = 0
    processing_ns: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def register(nc: Client, function: str, counters: Counters) -> Service:
    def stats(endpoint: EndpointStats) -> dict[str, object]:
        # The native columns of `nats micro stats`, filled with the worker's work.
        endpoint.num_requests = counters.processed
        endpoint.num_errors = counters.failed
        endpoint.processing_time = counters.processing_ns
        endpoint.average_processing_time = counters.processing_ns // max(counters.processed, 1)
        endpoint.last_error = counters.last_error
        return counters.as_dict()

    async def answer(request: Request) -> None:
        await request.respond(json.dumps(counters.as_dict()).encode())

    service = await add_service(
        nc,
        name=subjects.service(function),
        version=VERSION,
        description=f"orderflow function {function}",
        metadata={"function": function, "pid": str(os.getpid())},
        stats_handler=stats,
    )
    await service.add_endpoint(
        name="messages", subject=subjects.service_endpoint(function), handler=answer
    )
    return service
