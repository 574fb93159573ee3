"""The whole flow's figures, gathered over NATS in one pass: what ``runner.py exporter`` serves.

Every figure comes from NATS itself, so one gatherer covers every process:

* **instances**: the NATS micro ``STATS`` of every function (one answer per
  running process, ``orderflow.runtime.metrics``): its counters and its
  histogram of how long processed messages took;
* **consumers**: ``consumer_info`` of every durable of the running mode
  (pending, unacked, redelivered, pull requests waiting, paused);
* **streams**: ``stream_info`` of every stream and bucket;
* **dead letters** by function and reason (``orderflow.runtime.pipeline.reason_class``):
  read once, then only those stored since the last look (by sequence); read
  again in full only when some were deleted (redriven) meanwhile;
* **orders** created, completed, cancelled and rejected: counted by the
  server's subject index the first time (once: at a million messages about
  half a second of the server's time per kind), then only among the messages
  stored since (by sequence, from near the end: the new messages' cost, never
  the history's). Unfinished is created less the rest.

A :class:`Gatherer` keeps those two cursors, so it lives as long as the
exporter; one look at a time (:attr:`Gatherer.lock`), so concurrent scrapes
never count the same messages twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
from nats.aio.client import Client

from functions.events import OrderCancelled, OrderCompleted, OrderCreated, OrderRejected, subject_of
from orderflow import subjects
from orderflow.config import Topology
from orderflow.runtime import deadletter
from orderflow.runtime.kv import stream_name
from orderflow.runtime.pipeline import reason_class
from orderflow.tools.status import ask_all, unless_electing
from orderflow.tools.streamlog import matches_between, read_subject

#: Seconds a look waits for the instances' answers (micro discovery is scatter-gather).
STATS_WAIT = 0.3

#: An order's status -> the kind of event that says so.
ORDER_KINDS = {
    "created": subject_of(OrderCreated),
    "completed": subject_of(OrderCompleted),
    "cancelled": subject_of(OrderCancelled),
    "rejected": subject_of(OrderRejected),
}


@dataclass(frozen=True)
class Instance:
    """One running process of a function, as its NATS micro service answered."""

    function: str
    id: str
    data: dict[str, Any]  # orderflow.runtime.metrics.Counters.as_dict()


@dataclass(frozen=True)
class ConsumerFigures:
    function: str
    stream: str
    durable: str
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int
    paused: bool
    delivered: int  # deliveries so far (the consumer's own sequence)


@dataclass(frozen=True)
class StreamFigures:
    name: str
    messages: int
    bytes: int
    last_sequence: int
    consumers: int
    replicas: int
    current: int  # replicas caught up, the leader included


@dataclass
class FlowStats:
    instances: list[Instance] = field(default_factory=list)
    consumers: list[ConsumerFigures] = field(default_factory=list)
    streams: list[StreamFigures] = field(default_factory=list)
    dead_letters: dict[tuple[str, str], int] = field(default_factory=dict)  # (function, reason)
    orders: dict[str, int] = field(default_factory=dict)  # status -> orders
    #: What gave no answer this time (a stream or consumer electing a leader, or missing).
    silent: list[str] = field(default_factory=list)

    @property
    def unfinished(self) -> int:
        """Orders created and not yet completed, cancelled or rejected."""
        o = self.orders
        ended = o.get("completed", 0) + o.get("cancelled", 0) + o.get("rejected", 0)
        return max(0, o.get("created", 0) - ended)


class OrderCounts:
    """Orders by status, counted once by the subject index, then by what is appended since."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.counted_to = 0  # the last sequence counted
        self.counts = dict.fromkeys(ORDER_KINDS, 0)

    async def update(self, nc: Client) -> dict[str, int]:
        end = int((await nc.jetstream(timeout=2.0).stream_info(self.stream)).state.last_seq)
        if end < self.counted_to:  # the stream was purged or made anew: count again
            self.counted_to, self.counts = 0, dict.fromkeys(ORDER_KINDS, 0)
        first = self.counted_to + 1
        statuses = list(ORDER_KINDS)
        found = await asyncio.gather(*(self._between(nc, ORDER_KINDS[s], first, end)
                                       for s in statuses))  # fmt: skip
        for status, count in zip(statuses, found, strict=True):
            self.counts[status] += count
        self.counted_to = end
        return dict(self.counts)

    async def _between(self, nc: Client, kind: str, first: int, end: int) -> int:
        # Ingress has two subjects (payload-only orders.created, and under the order).
        counts = [await matches_between(nc, self.stream, f, first, end)
                  for f in subjects.filters(kind)]  # fmt: skip
        return sum(counts)


class DeadLetterReasons:
    """The dead letters kept, by function and reason class: each read once, by sequence."""

    def __init__(self, stream: str, prefix: str) -> None:
        self.stream = stream
        self.filter = f"{prefix}.>"
        self.read_to = 0  # the last sequence read
        self.kept: dict[int, tuple[str, str]] = {}  # sequence -> (function, reason class)

    async def update(self, nc: Client) -> dict[tuple[str, str], int]:
        state = (await nc.jetstream(timeout=2.0).stream_info(self.stream)).state
        first, last, messages = int(state.first_seq), int(state.last_seq), int(state.messages)
        if last < self.read_to:  # purged or made anew
            self.read_to, self.kept = 0, {}
        self.kept = {seq: v for seq, v in self.kept.items() if seq >= first}
        if last > self.read_to:
            await self._read(nc, self.read_to + 1)
        if sum(1 for seq in self.kept if seq <= last) != messages:
            # Some were deleted in between (a redrive): read what is left.
            self.kept = {}
            await self._read(nc, 0)
        return dict(Counter(self.kept.values()))

    async def _read(self, nc: Client, from_seq: int) -> None:
        for stored in await read_subject(nc, self.stream, self.filter, from_seq):
            h = stored.headers
            function = h.get(deadletter.FUNCTION, "?")
            self.kept[stored.sequence] = (function, reason_class(h.get(deadletter.REASON, "")))
            self.read_to = max(self.read_to, stored.sequence)


class Gatherer:
    """Every figure of the flow, gathered over one connection; keeps the counting cursors."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.orders = OrderCounts(topology.events_stream)
        letters = topology.dead_letters
        self.dead_letters = DeadLetterReasons(letters.stream, letters.subject_prefix)
        self.lock = asyncio.Lock()

    async def gather(self, nc: Client) -> FlowStats:
        async with self.lock:
            stats = FlowStats()
            names = list(self.topology.functions)
            answers, consumers, streams, letters, orders = await asyncio.gather(
                asyncio.gather(*(ask_all(nc, subjects.service_api("STATS", n), STATS_WAIT)
                                 for n in names)),
                self._consumers(nc, stats),
                self._streams(nc, stats),
                unless_electing(self.dead_letters.update(nc)),
                unless_electing(self.orders.update(nc)),
            )  # fmt: skip
            for name, replies in zip(names, answers, strict=True):
                stats.instances += [_instance(name, reply) for reply in replies]
            stats.consumers, stats.streams = consumers, streams
            if letters is None:
                stats.silent.append(self.dead_letters.stream)
            else:
                stats.dead_letters = letters
            if orders is None:
                stats.silent.append(self.orders.stream)
            else:
                stats.orders = orders
            return stats

    async def _consumers(self, nc: Client, stats: FlowStats) -> list[ConsumerFigures]:
        js = nc.jetstream(timeout=2.0)
        specs = [(name, c) for name, fn in self.topology.functions.items() for c in fn.consumers]

        async def one(function: str, stream: str, durable: str) -> ConsumerFigures | None:
            try:
                info = await unless_electing(js.consumer_info(stream, durable))
            except nats.js.errors.NotFoundError:
                info = None  # not provisioned (yet), or the other mode's
            if info is None:
                stats.silent.append(f"{stream} > {durable}")
                return None
            return ConsumerFigures(
                function=function,
                stream=stream,
                durable=durable,
                pending=info.num_pending or 0,
                ack_pending=info.num_ack_pending or 0,
                redelivered=info.num_redelivered or 0,
                waiting=info.num_waiting or 0,
                paused=bool(info.paused),
                delivered=(info.delivered.consumer_seq or 0) if info.delivered else 0,
            )

        found = await asyncio.gather(*(one(n, c.stream, c.durable) for n, c in specs))
        return [f for f in found if f is not None]

    async def _streams(self, nc: Client, stats: FlowStats) -> list[StreamFigures]:
        js = nc.jetstream(timeout=2.0)
        topology = self.topology
        names = [s.name for s in topology.streams] + [stream_name(b.name) for b in topology.buckets]

        async def one(name: str) -> StreamFigures | None:
            try:
                info = await unless_electing(js.stream_info(name))
            except nats.js.errors.NotFoundError:
                info = None
            if info is None:
                stats.silent.append(name)
                return None
            state, cluster = info.state, info.cluster
            peers = (cluster.replicas or []) if cluster else []
            leading = 1 if cluster and cluster.leader else 0
            return StreamFigures(
                name=name,
                messages=int(state.messages),
                bytes=int(state.bytes),
                last_sequence=int(state.last_seq),
                consumers=int(state.consumer_count or 0),
                replicas=int(info.config.num_replicas or 1),
                current=leading + sum(bool(p.current) for p in peers),
            )

        found = await asyncio.gather(*(one(n) for n in names))
        return [f for f in found if f is not None]


def _instance(function: str, reply: dict[str, Any]) -> Instance:
    data: dict[str, Any] = {}
    for endpoint in reply.get("endpoints") or []:
        data = endpoint.get("data") or data
    return Instance(function=function, id=str(reply.get("id", "?")), data=data)
