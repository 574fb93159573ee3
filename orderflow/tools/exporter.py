"""``runner.py exporter``: the whole flow as one Prometheus scrape target.

Each scrape gathers the flow's figures over NATS (``orderflow.tools.flowstats``:
every function's instances, consumers, streams, dead letters and orders) and
answers them in Prometheus's text format, written by ``prometheus_client``
(the extra ``exporter``), as the NATS project's own exporter does for the
server: one target covers every process, however many run and wherever.

The metrics (``docs/telemetry.md`` has the table and example queries):

* per instance (``function``, ``service_id``): ``orderflow_messages_*_total``
  (processed, failed, retried, dead-lettered) and the histogram
  ``orderflow_handler_duration_seconds``; ``orderflow_function_instances``;
* per consumer (``function``, ``stream``, ``consumer``):
  ``orderflow_consumer_{pending,ack_pending,redelivered,waiting,paused}`` and
  ``orderflow_consumer_delivered_total``;
* per stream: ``orderflow_stream_{messages,bytes,last_sequence,consumers}``,
  ``orderflow_stream_replicas`` and ``orderflow_stream_replicas_current``;
* ``orderflow_dead_letters`` by ``function`` and ``reason``;
* ``orderflow_orders_total`` by ``status`` (created, completed, cancelled,
  rejected) and ``orderflow_orders_unfinished``;
* ``orderflow_up`` (0 when NATS did not answer the scrape in time) and
  ``orderflow_scrape_duration_seconds``.

The HTTP server is ``prometheus_client``'s (a thread); a scrape asks the
event loop that holds the NATS connection and waits for its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from nats.aio.client import Client
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from orderflow.config import Topology
from orderflow.tools.flowstats import FlowStats, Gatherer

log = logging.getLogger("orderflow.tools.exporter")

#: Where the exporter listens unless told otherwise: this machine, next to the console's port.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8471
#: Seconds a scrape may take before it answers ``orderflow_up 0`` (Prometheus waits 10).
SCRAPE_TIMEOUT = 8.0

INSTANCE = ["function", "service_id"]
CONSUMER = ["function", "stream", "consumer"]
COUNTERS = {
    "processed": "Messages handled and acked, their outputs stored",
    "failed": "Attempts that raised (each retry and each final failure)",
    "retried": "Messages handed back to be tried again later",
    "dead_lettered": "Messages given up and filed as dead letters",
}


def families(stats: FlowStats | None, took_s: float) -> list[Metric]:
    """The flow's figures as Prometheus metric families; ``stats`` None: NATS did not answer."""
    up = GaugeMetricFamily("orderflow_up", "1 when NATS answered this scrape, else 0")
    up.add_metric([], 0.0 if stats is None else 1.0)
    took = GaugeMetricFamily("orderflow_scrape_duration_seconds", "How long gathering took")
    took.add_metric([], took_s)
    if stats is None:
        return [up, took]
    return [up, took, *_instances(stats), *_consumers(stats), *_streams(stats),
            *_outcomes(stats)]  # fmt: skip


def _instances(stats: FlowStats) -> Iterable[Metric]:
    count = GaugeMetricFamily("orderflow_function_instances",
                              "Processes of the function answering its NATS micro service",
                              labels=["function"])  # fmt: skip
    per_function: dict[str, int] = {}
    for i in stats.instances:
        per_function[i.function] = per_function.get(i.function, 0) + 1
    for function, n in per_function.items():
        count.add_metric([function], n)
    yield count
    for key, help_text in COUNTERS.items():
        counter = CounterMetricFamily(f"orderflow_messages_{key}", help_text, labels=INSTANCE)
        for i in stats.instances:
            counter.add_metric([i.function, i.id], float(i.data.get(key, 0)))
        yield counter
    durations = HistogramMetricFamily(
        "orderflow_handler_duration_seconds",
        "How long a processed message took: the handler, its publishes, the ack",
        labels=INSTANCE,
    )
    for i in stats.instances:
        bounds, counts = i.data.get("duration_bounds_s"), i.data.get("durations")
        if not bounds or not counts or len(counts) != len(bounds) + 1:
            continue  # an instance of an older version: no histogram
        buckets, total = [], 0
        for bound, n in zip([*map(float, bounds), float("inf")], counts, strict=True):
            total += int(n)
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        durations.add_metric([i.function, i.id], buckets, int(i.data.get("processing_ns", 0)) / 1e9)
    yield durations


def _consumers(stats: FlowStats) -> Iterable[Metric]:
    gauges = {
        "pending": "Messages not yet delivered to the consumer",
        "ack_pending": "Messages delivered and not yet acked (in hand)",
        "redelivered": "Messages delivered more than once and not yet acked",
        "waiting": "Pull requests waiting (processes asking for messages)",
        "paused": "1 while the consumer is paused (runner.py pause)",
    }
    for key, help_text in gauges.items():
        gauge = GaugeMetricFamily(f"orderflow_consumer_{key}", help_text, labels=CONSUMER)
        for c in stats.consumers:
            gauge.add_metric([c.function, c.stream, c.durable], float(getattr(c, key)))
        yield gauge
    delivered = CounterMetricFamily("orderflow_consumer_delivered",
                                    "Deliveries by the consumer so far, redeliveries included",
                                    labels=CONSUMER)  # fmt: skip
    for c in stats.consumers:
        delivered.add_metric([c.function, c.stream, c.durable], float(c.delivered))
    yield delivered


def _streams(stats: FlowStats) -> Iterable[Metric]:
    gauges = {
        "messages": "Messages the stream holds",
        "bytes": "Bytes the stream holds",
        "last_sequence": "The stream's last sequence: every message ever stored in it",
        "consumers": "Consumers of the stream",
        "replicas": "Copies of the stream the configuration asks for",
        "replicas_current": "Copies caught up with the leader, the leader included",
    }
    field_of = {"replicas_current": "current"}
    for key, help_text in gauges.items():
        gauge = GaugeMetricFamily(f"orderflow_stream_{key}", help_text, labels=["stream"])
        for s in stats.streams:
            gauge.add_metric([s.name], float(getattr(s, field_of.get(key, key))))
        yield gauge


def _outcomes(stats: FlowStats) -> Iterable[Metric]:
    letters = GaugeMetricFamily("orderflow_dead_letters",
                                "Dead letters kept, by the function that gave up and why",
                                labels=["function", "reason"])  # fmt: skip
    for (function, reason), n in sorted(stats.dead_letters.items()):
        letters.add_metric([function, reason], n)
    yield letters
    if not stats.orders:
        return  # the orders' stream did not answer: nothing rather than zeros
    orders = CounterMetricFamily("orderflow_orders",
                                 "Orders by status, from the orders' stream (created: every "
                                 "ingress message)", labels=["status"])  # fmt: skip
    for status, n in stats.orders.items():
        orders.add_metric([status], n)
    yield orders
    unfinished = GaugeMetricFamily(
        "orderflow_orders_unfinished", "Orders created, not yet completed, cancelled or rejected"
    )
    unfinished.add_metric([], stats.unfinished)
    yield unfinished


class FlowCollector:
    """A ``prometheus_client`` collector that gathers on the event loop holding the connection.

    ``collect`` runs in the HTTP server's thread: it hands the gathering to the
    loop and waits for it, at most :data:`SCRAPE_TIMEOUT`.
    """

    def __init__(self, nc: Client, gatherer: Gatherer, loop: asyncio.AbstractEventLoop) -> None:
        self.nc, self.gatherer, self.loop = nc, gatherer, loop

    def describe(self) -> list[Metric]:
        return []  # registering must not scrape

    def collect(self) -> list[Metric]:
        started = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(self.gatherer.gather(self.nc), self.loop)
        stats: FlowStats | None = None
        try:
            stats = future.result(SCRAPE_TIMEOUT)
        except Exception as exc:  # NATS away, or too slow: say so in orderflow_up
            future.cancel()
            log.warning("exporter: could not gather the flow's figures: %r", exc)
        for silent in stats.silent if stats else []:
            log.info("exporter: no answer from %s (electing, or not provisioned?)", silent)
        return families(stats, time.monotonic() - started)


async def serve(
    nc: Client,
    topology: Topology,
    stop: asyncio.Event,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    started: Callable[[str], None] | None = None,
) -> None:
    """Answer scrapes on ``http://host:port/metrics`` until ``stop`` is set."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowCollector(nc, Gatherer(topology), asyncio.get_running_loop()))
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise SystemExit(f"exporter: cannot listen on {host}:{port}: {exc}") from None
    try:
        if started is not None:
            started(f"http://{host}:{server.server_port}/metrics")
        await stop.wait()
    finally:
        # shutdown() waits for serve_forever to return: not on the loop a scrape waits on.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join(timeout=5)
