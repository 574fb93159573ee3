"""What a function process has done so far, and how it shows up in ``nats micro``.

Each function process registers as a NATS micro service (``orderflow-<name>``)
with one endpoint, ``messages``, whose stats are the worker's counters:
``num_requests`` counts processed messages, ``num_errors`` failed attempts,
``processing_time`` the time spent handling them; ``data`` adds retried and
dead-lettered counts, the last error, and how long each processed message took
as a histogram (``durations``: counts per bucket of ``duration_bounds_s``, the
last one past every bound), which ``runner.py exporter`` serves to Prometheus
(``orderflow.tools.exporter``). So ``nats micro ls`` lists every
running instance and ``nats micro stats orderflow-payment`` its work, with
nothing but the NATS micro protocol. A request to the endpoint subject
(``orderflow.<name>.messages``) answers with the same counters as JSON.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import asdict, dataclass, field

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from orderflow import subjects

VERSION = "0.1.0"

#: Upper bounds (seconds) of the duration histogram's buckets: a handler's own
#: work is a millisecond or less; waiting on the server (a publish's ack, a KV
#: round trip) or a gateway timeout make up the rest of the range.
DURATION_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)  # fmt: skip
_BOUNDS_NS = tuple(round(b * 1e9) for b in DURATION_BOUNDS_S)


@dataclass
class Counters:
    processed: int = 0  # handled and acked, outputs published
    failed: int = 0  # attempts that raised (each retry or final failure)
    retried: int = 0  # handed back with a delay
    dead_lettered: int = 0
    processing_ns: int = 0
    last_error: str | None = None
    #: Processed messages by how long they took (handler, publishes, ack), per bucket
    #: of DURATION_BOUNDS_S; the last counts those over every bound. Not cumulative.
    durations: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS_NS) + 1))

    def handled(self, took_ns: int) -> None:
        """One message processed in ``took_ns``."""
        self.processed += 1
        self.processing_ns += took_ns
        # A value equal to a bound belongs to its bucket (Prometheus's `le`).
        self.durations[bisect.bisect_left(_BOUNDS_NS, took_ns)] += 1

    def failure(self, error: str) -> None:
        """One failed attempt, ``error`` saying what it was."""
        self.failed += 1
        self.last_error = error[:500]

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "duration_bounds_s": list(DURATION_BOUNDS_S)}


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
