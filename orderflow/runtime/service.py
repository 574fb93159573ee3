"""One function as one OS process: connect, reconcile its consumers, consume until told to stop.

SIGTERM and SIGINT stop asking for messages and stop listening for them (the
server drops the pull requests still open, so what comes next goes to another
process); messages already in hand are seen through and acked, then the
connection is flushed and closed, and the spans still buffered are sent (when
tracing is on). Nothing in hand is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable

import nats.js.errors
from nats.aio.client import Client

from orderflow.config import Topology
from orderflow.runtime.bindings import build_handler, build_responder
from orderflow.runtime.connect import connect
from orderflow.runtime.consumers import Report, ensure_consumers
from orderflow.runtime.kv import KvStore
from orderflow.runtime.metrics import Counters, register
from orderflow.runtime.requests import Responder
from orderflow.runtime.tracing import tracer_for
from orderflow.runtime.worker import Worker

log = logging.getLogger("orderflow.runtime.service")

#: Seconds between attempts to reconcile consumers while the servers are silent.
RECONCILE_AGAIN = 1.0


async def serve(
    url: str, topology: Topology, function: str, stop: asyncio.Event | None = None
) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect(url, name=f"orderflow-{function}")
    # OFF unless the extra and the OTEL_* environment ask for spans (orderflow.runtime.tracing).
    tracer = tracer_for(function, topology.functions[function])
    try:
        # pull_subscribe ignores the config of an existing durable: reconcile
        # it with streams.yaml here, so a changed setting takes effect.
        report = await _reconcile(nc, topology, function, stop)
        if report is None:
            return  # told to stop before the servers answered
        for line in report.lines:
            log.info("%s: %s", function, line)
        spec = topology.functions[function]
        leader_reads = await _replicated(nc, topology, function)
        counters = Counters()
        loops: list[Awaitable[None]] = []
        if spec.consumers:
            handler = build_handler(topology, function, lambda bucket: KvStore(nc, bucket))
            worker = Worker(nc, topology, function, handler, leader_reads, counters, tracer)
            loops.append(worker.run(stop))
        if spec.serves:
            responder = build_responder(topology, function)
            loops.append(
                Responder(nc, topology, function, responder, counters, leader_reads, tracer).run(
                    stop
                )
            )
        service = await register(nc, function, counters)
        log.info("%s: consuming (pid %d, service %s)", function, os.getpid(), service.id)
        await asyncio.gather(*loops)
        await service.stop()
        log.info("%s: stopping: in-flight messages settled", function)
    finally:
        # close(), not drain(): drain was seen to block for its whole timeout
        # (30 s) after a timed-out fetch. Everything we sent is flushed first.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.flush(), 2.0)
        await nc.close()
        tracer.shutdown()  # the spans still buffered, sent before the process exits


async def _replicated(nc: Client, topology: Topology, function: str) -> bool:
    """Whether the orders' stream has followers, which may lag: then joins read from its
    leader. Asked of the function's own consumer (its permissions allow that, not the
    stream's info): a consumer's peers are its stream's."""
    events = topology.events_stream
    for spec in topology.functions[function].consumers:
        if spec.stream == events:
            info = await nc.jetstream().consumer_info(spec.stream, spec.durable)
            return bool(info.cluster and info.cluster.replicas)
    # Not fed from it (or served requests only): reads are rare, the leader is always right.
    return True


async def _reconcile(
    nc: Client, topology: Topology, function: str, stop: asyncio.Event
) -> Report | None:
    """``ensure_consumers``, tried again while the servers do not answer.

    A process that starts while a cluster is electing leaders (5-7 s after a
    server crashed) would otherwise exit and be restarted into the same gap.
    Anything but silence (a missing stream, say) still fails at once.
    """
    while True:
        report = Report()
        try:
            await ensure_consumers(nc, topology, function, report)
            return report
        except (TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            log.warning("%s: no answer reconciling consumers (%r); trying again", function, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RECONCILE_AGAIN)
        if stop.is_set():
            return None
