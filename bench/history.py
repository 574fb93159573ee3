"""``trace`` and ``stuck`` against a long history: ORDERS filled fast with valid orders, then timed.

Running the flow to a million messages would take hours on a small machine,
so the history is written directly, the way the flow writes it (see the
stored messages of any demo run):

* ``orders.created``: the payload-only ingress, no headers (``nats pub``);
* ``order.<ID>.payments.succeeded`` and ``order.<ID>.stock.reserved``, caused
  by the ingress's position (``ORDERS:<seq>``), then
  ``order.<ID>.delivery.scheduled`` caused by ``stock.reserved:<ID>`` and
  ``order.<ID>.orders.completed`` caused by ``delivery.scheduled:<ID>``: each
  with the headers ``orderflow.runtime.context.headers_for`` gives and the guard
  ``orderflow.runtime.emit`` adds (``Nats-Expected-Last-Subject-Sequence: 0``), the
  payloads encoded from ``functions.events``.

Publishes are pipelined: plain publishes with a reply subject each, at most
``WINDOW`` awaiting their stream ack, every ack checked. Orders go in chunks
(``CHUNK`` ``orders.created``, then their reactions), so an order's five
messages lie within a few thousand sequences of each other, as they do when
the flow runs at saturation.

Unfinished orders, the ones ``stuck`` must find:

* **old, held by a dead letter**: in the first chunk, ``OLD_UNFINISHED``
  orders are paid and reserved but never scheduled, and delivery's dead letter
  on their ``stock.reserved`` waits in DEAD_LETTERS (``dlq.<ID>.delivery``,
  headers as ``orderflow.runtime.deadletter`` writes them);
* **recent, not yet handled**: after each size is reached the consumers are
  re-created past the end of the stream (``orderflow.runtime.consumers.consumer_config`` with
  ``start_after``, as a mode switch does: everything before is settled), and
  ``RECENT_UNFINISHED`` new orders, paid but not reserved, wait on the stock
  and delivery consumers (stock is down). They are completed before the
  history grows again. (Not ``orders.created`` alone: ``trace.load`` finds
  no message of such an order, since the payload-only ingress is found only
  through the position its reactions name, so ``stuck`` leaves it out.)

At each size: ``trace.load`` of one order (the oldest complete one, one at
55 % of the stream, the newest complete one) and ``trace.stuck`` (older than
0 s), in-process on one connection, several times each (the median and the
first, cold, call); and each CLI command once (``runner.py trace`` and
``runner.py stuck``, a new process: interpreter start included).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.delivery import CARRIER, tracking_id
from functions.events import (
    DeliveryScheduled,
    Event,
    OrderCompleted,
    OrderCreated,
    PaymentSucceeded,
    StockLine,
    StockReserved,
    event_id,
    subject_of,
)
from orderflow import subjects
from orderflow.config import Topology
from orderflow.runtime import deadletter as dl
from orderflow.runtime.consumers import consumer_config
from orderflow.runtime.context import headers_for, input_event_id
from orderflow.runtime.emit import EXPECTED_LAST_SUBJECT_SEQUENCE
from orderflow.tools import status as status_mod
from orderflow.tools import trace as trace_mod
from orderflow.tools.demo import make_order, payload

#: Publishes awaiting their stream ack at once.
WINDOW = 2000
#: orders.created published together, before their reactions.
CHUNK = 2000
#: Messages of one complete order in ORDERS.
COMPLETE = 5
OLD_UNFINISHED = 20
RECENT_UNFINISHED = 20
#: Messages of a recent unfinished order: orders.created, payments.succeeded.
RECENT_MESSAGES = 2
#: Repetitions of each timed call.
TRACE_REPEAT = 9
STUCK_REPEAT = 5
#: Where in the stream the "middle" order is, as a fraction of its sequences.
MIDDLE = 0.55
#: How long a message block's subject index stays in the server's memory unused
#: (nats-server's defaultFssExpiration, 2 min), and a margin: after this long
#: idle, a trace reads a history nobody touched lately (``cold``).
COLD_WAIT_S = 135.0
#: How long status.ask_all waits for answers (its default).
PING_WAIT: float = inspect.signature(status_mod.ask_all).parameters["wait"].default

_encode = msgspec.json.Encoder().encode


class Pipeline:
    """Plain publishes with one reply subject each; at most ``window`` awaiting their ack."""

    def __init__(self, nc: Client, window: int = WINDOW) -> None:
        self.nc = nc
        self.window = asyncio.Semaphore(window)
        self.inbox = nc.new_inbox()
        self.sequences: dict[int, int] = {}
        self.errors: list[str] = []
        self.sent = 0
        self.pending = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.sub: Any = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._acked)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> int:
        """Send one message; its number, whose stream sequence ``sequences`` gets on ack."""
        await self.window.acquire()
        self.sent += 1
        self.pending += 1
        self.idle.clear()
        await self.nc.publish(subject, data, reply=f"{self.inbox}.{self.sent}", headers=headers)
        return self.sent

    async def _acked(self, msg: Msg) -> None:
        number = int(msg.subject.rsplit(".", 1)[1])
        reply = json.loads(msg.data) if msg.data else {}
        if "seq" in reply:
            self.sequences[number] = int(reply["seq"])
        else:
            self.errors.append(f"publish {number}: {reply or msg.headers}")
        self.pending -= 1
        self.window.release()
        if not self.pending:
            self.idle.set()

    async def settled(self, timeout: float = 60.0) -> None:
        """Until every publish so far is acked; raises on any refused one."""
        await self.nc.flush()
        await asyncio.wait_for(self.idle.wait(), timeout)
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} publishes refused, e.g. {self.errors[0]}")


def _headers(event: Event, function: str, cause: dict[str, str], cause_id: str) -> dict[str, str]:
    return headers_for(
        event_id=event_id(event),
        order_id=event.order_id,
        function=function,
        cause=cause,
        cause_id=cause_id,
        schema_version=event.schema_version,
    ) | {EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}


@dataclass
class Generator:
    """Appends valid order histories to the events stream of ``topology``."""

    nc: Client
    topology: Topology
    rng: random.Random = field(default_factory=lambda: random.Random(42))
    serial: int = 0
    #: (order id, sequence of its orders.created) of every complete order, in order
    complete: list[tuple[str, int]] = field(default_factory=list)
    old_unfinished: list[str] = field(default_factory=list)
    recent_unfinished: list[tuple[OrderCreated, int]] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return self.topology.events_stream

    def _new_order(self) -> OrderCreated:
        self.serial += 1
        return make_order(f"h-{self.serial:07d}", "happy", self.rng)

    async def _created(self, pipe: Pipeline, orders: list[OrderCreated]) -> list[int]:
        numbers = [await pipe.publish(subjects.INGRESS, payload(o), None) for o in orders]
        await pipe.settled()
        return [pipe.sequences.pop(n) for n in numbers]

    async def _react(
        self, pipe: Pipeline, order: OrderCreated, seq: int, upto: int = COMPLETE, since: int = 1
    ) -> list[tuple[Event, dict[str, str]]]:
        """Publish the order's messages after its ``orders.created``: those numbered
        ``since`` to ``upto`` - 1 (``orders.created`` is 0, ``orders.completed`` 4)."""
        oid = order.order_id
        ingress = input_event_id({}, self.stream, seq)
        paid = PaymentSucceeded(oid, order.total_cents, charge_id=f"ch_{oid}")
        reserved = StockReserved(oid, items=[StockLine(i.sku, i.quantity) for i in order.items])
        steps: list[tuple[Event, dict[str, str]]] = [
            (paid, _headers(paid, "payment", {}, ingress)),
            (reserved, _headers(reserved, "stock", {}, ingress)),
        ]
        scheduled = DeliveryScheduled(oid, tracking_id=tracking_id(oid), carrier=CARRIER)
        steps.append((scheduled, _headers(scheduled, "delivery", steps[1][1], event_id(reserved))))
        done = OrderCompleted(oid, tracking_id=scheduled.tracking_id)
        steps.append((done, _headers(done, "order", steps[2][1], event_id(scheduled))))
        for event, headers in steps[since - 1 : upto - 1]:
            kind = subject_of(type(event))
            await pipe.publish(subjects.subject(kind, oid), _encode(event), headers)
        return steps

    async def add_complete(self, count: int) -> None:
        pipe = Pipeline(self.nc)
        await pipe.start()
        try:
            left = count
            while left > 0:
                orders = [self._new_order() for _ in range(min(CHUNK, left))]
                seqs = await self._created(pipe, orders)
                for order, seq in zip(orders, seqs, strict=True):
                    await self._react(pipe, order, seq)
                    self.complete.append((order.order_id, seq))
                await pipe.settled()
                left -= len(orders)
        finally:
            await pipe.stop()

    async def add_old_unfinished(self, count: int) -> None:
        """Paid and reserved, never scheduled: delivery dead-lettered the reservation."""
        pipe = Pipeline(self.nc)
        await pipe.start()
        try:
            orders = [self._new_order() for _ in range(count)]
            seqs = await self._created(pipe, orders)
            numbers: list[tuple[OrderCreated, dict[str, str], int]] = []
            for order, seq in zip(orders, seqs, strict=True):
                steps = await self._react(pipe, order, seq, upto=3)
                _, headers = steps[1]
                numbers.append((order, headers, pipe.sent))
            await pipe.settled()
            letters = self.topology.dead_letters
            for order, headers, number in numbers:
                sequence = pipe.sequences[number]
                subject = subjects.subject("stock.reserved", order.order_id)
                reserved = StockReserved(
                    order.order_id, items=[StockLine(i.sku, i.quantity) for i in order.items]
                )
                # As orderflow.runtime.deadletter files it: the input's headers, and why.
                dead = dict(headers) | {
                    "Nats-Msg-Id": f"dlq:delivery:{self.stream}:{sequence}",
                    dl.REASON: "ValueError: the benchmark's stand-in for a bug",
                    dl.FUNCTION: "delivery",
                    dl.SUBJECT: subject,
                    dl.STREAM: self.stream,
                    dl.SEQUENCE: str(sequence),
                    dl.DELIVERIES: "8",
                    dl.TIME: datetime.now(UTC).isoformat(timespec="milliseconds"),
                }
                target = subjects.dead_letter(letters.subject_prefix, order.order_id, "delivery")
                await pipe.publish(target, _encode(reserved), dead)
                self.old_unfinished.append(order.order_id)
            await pipe.settled()
        finally:
            await pipe.stop()

    async def add_recent_unfinished(self, count: int) -> None:
        pipe = Pipeline(self.nc)
        await pipe.start()
        try:
            orders = [self._new_order() for _ in range(count)]
            seqs = await self._created(pipe, orders)
            self.recent_unfinished = list(zip(orders, seqs, strict=True))
            for order, seq in self.recent_unfinished:
                await self._react(pipe, order, seq, upto=RECENT_MESSAGES)
            await pipe.settled()
        finally:
            await pipe.stop()

    async def finish_recent(self) -> None:
        """Complete the recent unfinished orders (before the history grows past them)."""
        pipe = Pipeline(self.nc)
        await pipe.start()
        try:
            for order, seq in self.recent_unfinished:
                await self._react(pipe, order, seq, since=2)
                self.complete.append((order.order_id, seq))
            await pipe.settled()
            self.recent_unfinished = []
        finally:
            await pipe.stop()

    async def last_seq(self) -> int:
        return int((await self.nc.jetstream().stream_info(self.stream)).state.last_seq)

    async def settle_consumers(self) -> None:
        """Every function's consumers start past the end: what is stored so far is handled."""
        js = self.nc.jetstream()
        for fn in self.topology.functions.values():
            for spec in fn.consumers:
                last = int((await js.stream_info(spec.stream)).state.last_seq)
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_consumer(spec.stream, spec.durable)
                await js.add_consumer(spec.stream, consumer_config(spec, start_after=last))


# --- timing ---------------------------------------------------------------------------


@dataclass
class Timed:
    median_ms: float
    first_ms: float
    max_ms: float

    @classmethod
    def of(cls, took: list[float]) -> Timed:
        ms = [t * 1000 for t in took]
        return cls(round(statistics.median(ms), 1), round(ms[0], 1), round(max(ms), 1))


async def timed(call: Callable[[], Awaitable[object]], repeat: int) -> tuple[Timed, object]:
    took = []
    result: object = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await call()
        took.append(time.perf_counter() - started)
    return Timed.of(took), result


@dataclass
class SizeResult:
    messages: int  # in ORDERS
    complete_orders: int
    unfinished_old: int
    unfinished_recent: int
    stream_bytes: int
    blocks: int  # message block files of ORDERS on disk
    generate_s: float  # to append this size's messages
    generate_msgs_per_s: float
    trace: dict[str, Timed] = field(default_factory=dict)  # old / middle / recent
    # One trace of each after COLD_WAIT_S idle (recent, then old, then middle).
    trace_cold_ms: dict[str, float] = field(default_factory=dict)
    trace_sequence: dict[str, int] = field(default_factory=dict)  # where each traced order starts
    stuck: Timed | None = None
    stuck_found: int = 0
    in_flight: Timed | None = None  # the part of stuck that finds candidates
    stuck_ping_wait_s: float = 0.0  # of stuck: PINGs of the owing functions' instances
    cli_trace_s: float = 0.0
    cli_stuck_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def _blocks(store_dir: Path, stream: str) -> int:
    msgs = store_dir / "jetstream" / "$G" / "streams" / stream / "msgs"
    return len(list(msgs.glob("*.blk"))) if msgs.is_dir() else 0


def _cli(url: str, root: Path, *args: str) -> tuple[float, str]:
    env = dict(os.environ, NATS_URL=url)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(root / "runner.py"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        return took, f"runner.py {' '.join(args)}: exit {done.returncode}: {done.stderr[-300:]}"
    return took, ""


async def measure_size(
    gen: Generator,
    url: str,
    root: Path,
    store_dir: Path,
    target: int,
    say: Callable[[str], None],
    cold: bool = False,
) -> SizeResult:
    """Grow ORDERS to about ``target`` messages, then time trace and stuck."""
    started = time.perf_counter()
    before = await gen.last_seq()
    if gen.recent_unfinished:
        await gen.finish_recent()
    if not gen.old_unfinished:
        await gen.add_old_unfinished(OLD_UNFINISHED)
    room = target - RECENT_UNFINISHED * RECENT_MESSAGES - await gen.last_seq()
    await gen.add_complete(max(0, room // COMPLETE))
    await gen.settle_consumers()
    await gen.add_recent_unfinished(RECENT_UNFINISHED)
    generate_s = time.perf_counter() - started
    info = await gen.nc.jetstream().stream_info(gen.stream)
    messages = int(info.state.last_seq)
    result = SizeResult(
        messages=messages,
        complete_orders=len(gen.complete),
        unfinished_old=len(gen.old_unfinished),
        unfinished_recent=len(gen.recent_unfinished),
        stream_bytes=int(info.state.bytes),
        blocks=_blocks(store_dir, gen.stream),
        generate_s=round(generate_s, 1),
        generate_msgs_per_s=round((messages - before) / generate_s) if generate_s else 0.0,
    )
    size = f"{result.blocks} blocks, {result.stream_bytes / 1e6:.0f} MB"
    say(f"    {messages:,} messages in {gen.stream} ({size}), "
        f"appended at {result.generate_msgs_per_s:,.0f}/s")  # fmt: skip

    nc, topology = gen.nc, gen.topology
    middle_at = MIDDLE * messages
    picks = {
        "old": gen.complete[0],
        "middle": min(gen.complete, key=lambda c: abs(c[1] - middle_at)),
        "recent": gen.complete[-1],
    }
    if cold:
        say(f"    idle {COLD_WAIT_S:g} s, then one cold trace each ...")
        await asyncio.sleep(COLD_WAIT_S)
        for name in ("recent", "old", "middle"):
            started = time.perf_counter()
            await trace_mod.load(nc, topology, [picks[name][0]])
            result.trace_cold_ms[name] = round((time.perf_counter() - started) * 1000, 1)
    for name, (oid, seq) in picks.items():

        async def one(oid: str = oid) -> object:
            return await trace_mod.load(nc, topology, [oid])

        took, found = await timed(one, TRACE_REPEAT)
        result.trace[name] = took
        result.trace_sequence[name] = seq
        assert isinstance(found, dict)
        got = found.get(oid)
        if got is None or got.outcome != "completed" or len(got.steps) != COMPLETE:
            result.problems.append(f"trace {name} {oid}: {got and (got.outcome, len(got.steps))}")

    now = datetime.now(UTC)

    async def candidates() -> object:
        return await trace_mod.in_flight(nc, topology)

    async def stuck() -> object:
        return await trace_mod.stuck(nc, topology, 0.0, now)

    result.in_flight, _ = await timed(candidates, STUCK_REPEAT)
    result.stuck, found = await timed(stuck, STUCK_REPEAT)
    assert isinstance(found, list)
    result.stuck_found = len(found)
    # trace.load asks the instances of every function owing a step (micro PING), each
    # time waiting out status.ask_all's window for their answers.
    owing = {o.function for t in found for o in t.owed}
    result.stuck_ping_wait_s = round(len(owing) * PING_WAIT, 2)
    expected = set(gen.old_unfinished) | {o.order_id for o, _ in gen.recent_unfinished}
    if {t.order_id for t in found} != expected:
        result.problems.append(f"stuck found {len(found)} orders, expected {len(expected)}")

    trace_s, problem = await asyncio.to_thread(_cli, url, root, "trace", picks["old"][0])
    stuck_s, problem2 = await asyncio.to_thread(_cli, url, root, "stuck", "--older-than", "0s")
    result.cli_trace_s, result.cli_stuck_s = round(trace_s, 2), round(stuck_s, 2)
    result.problems += [p for p in (problem, problem2) if p]
    say(f"    trace old/middle/recent {result.trace['old'].median_ms} / "
        f"{result.trace['middle'].median_ms} / {result.trace['recent'].median_ms} ms, "
        f"stuck {result.stuck.median_ms} ms ({result.stuck_found} orders), "
        f"CLI trace {result.cli_trace_s} s, stuck {result.cli_stuck_s} s")  # fmt: skip
    return result


async def run(
    url: str,
    topology: Topology,
    root: Path,
    store_dir: Path,
    sizes: list[int],
    say: Callable[[str], None],
    cold: bool = False,
) -> list[SizeResult]:
    """One server, its ORDERS grown to each size in turn (no function running)."""
    from orderflow.runtime.connect import connect

    nc = await connect(url, name="bench-history")
    try:
        gen = Generator(nc, topology)
        results = []
        for size in sorted(sizes):
            say(f"  history: growing {topology.events_stream} to {size:,} messages ...")
            results.append(await measure_size(gen, url, root, store_dir, size, say, cold))
        return results
    finally:
        await nc.close()
