"""orderflow.runtime.worker.Worker on a real server, one function ("delivery") with handlers
of our own: what is acked and when, retries with their delays, and every way to the dead
letters.

The consumer's acks are seen as the server sees them: a subscription on its ack subjects
($JS.ACK.ORDERS.delivery...) gets a copy of every +ACK, -NAK and +WPI the worker sends.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from functions.errors import Permanent
from functions.events import (
    DeliveryScheduled,
    Event,
    OrderCompleted,
    OrderCreated,
    PaymentSucceeded,
    subject_of,
)
from functions.history import History
from orderflow import subjects
from orderflow.config import RetrySpec, Topology
from orderflow.runtime import context
from orderflow.runtime.consumers import Report, ensure_consumers
from orderflow.runtime.pipeline import Handler
from orderflow.runtime.worker import RetryNote, Worker
from orderflow.tools.dlq import DeadLetter, dead_letters
from orderflow.tools.streamlog import Stored, read_stream, read_subject
from tests.waiting import until, value_when

FUNCTION = "delivery"
DURABLE = "delivery"


def tightened(
    topology: Topology,
    backoff: list[str] | None = None,
    max_deliver: int | None = None,
    concurrency: int | None = None,
) -> Topology:
    """``delivery`` with other settings (the consumer must be reconciled to match)."""
    spec = topology.functions[FUNCTION]
    consumers = [
        msgspec.structs.replace(c, max_deliver=max_deliver or c.max_deliver) for c in spec.consumers
    ]
    spec = msgspec.structs.replace(
        spec,
        consumers=consumers,
        retry=RetrySpec(backoff=backoff) if backoff else spec.retry,
        concurrency=concurrency or spec.concurrency,
    )
    return msgspec.structs.replace(topology, functions={**topology.functions, FUNCTION: spec})


async def reconciled(nc: Client, topology: Topology) -> Topology:
    await ensure_consumers(nc, topology, FUNCTION, Report())
    return topology


@dataclass
class Acks:
    """Every acknowledgement the worker sent, in order: (when, what)."""

    seen: list[tuple[float, bytes]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        # nats-py acks with an empty body, which the server reads as +ACK.
        return [body.split(b" ")[0].decode() or "+ACK" for _, body in self.seen]

    def nak_delays(self) -> list[float]:
        return [
            json.loads(body.split(b" ", 1)[1])["delay"] / 1e9
            for _, body in self.seen
            if body.startswith(b"-NAK ")
        ]


async def watch_acks(nc: Client) -> Acks:
    acks = Acks()

    async def seen(msg: Msg) -> None:
        acks.seen.append((time.monotonic(), msg.data))

    await nc.subscribe(subjects.acks("ORDERS", DURABLE), cb=seen)
    await nc.flush()
    return acks


@asynccontextmanager
async def running(nc: Client, topology: Topology, handler: Handler) -> AsyncIterator[Worker]:
    worker = Worker(nc, topology, FUNCTION, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)


def paid(order_id: str) -> PaymentSucceeded:
    return PaymentSucceeded(order_id, 1500, charge_id=f"ch-{order_id}")


async def publish(nc: Client, event: Event) -> int:
    subject = subjects.subject(subject_of(type(event)), event.order_id)
    return (await nc.jetstream().publish(subject, msgspec.json.encode(event))).seq


async def publish_raw(nc: Client, subject: str, data: bytes) -> int:
    return (await nc.jetstream().publish(subject, data)).seq


async def consumer(nc: Client) -> ConsumerInfo:
    info: ConsumerInfo = await nc.jetstream().consumer_info("ORDERS", DURABLE)
    return info


def acked_to(info: ConsumerInfo) -> int:
    """The stream sequence of the consumer's ack floor."""
    assert info.ack_floor is not None
    seq: int = info.ack_floor.stream_seq
    return seq


def delivered_to(info: ConsumerInfo) -> int:
    assert info.delivered is not None
    seq: int = info.delivered.stream_seq
    return seq


async def settled(nc: Client, stream_seq: int, timeout: float = 5.0) -> ConsumerInfo:
    """The consumer once everything up to ``stream_seq`` is acked."""
    return await value_when(
        lambda: consumer(nc),
        lambda i: acked_to(i) >= stream_seq and i.num_ack_pending == 0,
        timeout,
        f"acked up to {stream_seq}",
    )


async def letters(nc: Client, topology: Topology, count: int, timeout: float) -> list[DeadLetter]:
    async def stored() -> bool:
        info = await nc.jetstream().stream_info(topology.dead_letters.stream)
        return bool(info.state.messages >= count)

    await until(stored, timeout, f"{count} dead letters")
    return await dead_letters(nc, topology)


async def kinds_of(nc: Client, order_id: str) -> list[str]:
    return [s.kind for s in await read_subject(nc, "ORDERS", subjects.of_order(order_id))]


async def test_an_answered_message_is_acked_once_its_output_is_stored(
    provisioned: Client, topology: Topology
) -> None:
    nc = provisioned
    output = subjects.subject("delivery.scheduled", "o-1")
    stored_when_acked: list[list[Stored]] = []
    acks = Acks()

    async def on_ack(msg: Msg) -> None:
        acks.seen.append((time.monotonic(), msg.data))
        # At the moment the server gets the ack, is the output in the stream?
        stored_when_acked.append(await read_subject(nc, "ORDERS", output))

    await nc.subscribe(subjects.acks("ORDERS", DURABLE), cb=on_ack)

    async def handler(event: Event, history: History) -> Sequence[Event]:
        return [
            DeliveryScheduled(
                event.order_id, tracking_id=f"trk-{event.order_id}", carrier="orderflow-post"
            )
        ]

    async with running(nc, topology, handler) as worker:
        seq = await publish(nc, paid("o-1"))
        info = await settled(nc, seq)
    assert acks.kinds() == ["+ACK"]
    [[at_ack]] = stored_when_acked
    assert at_ack.sequence > seq
    assert msgspec.json.decode(at_ack.data, type=DeliveryScheduled) == DeliveryScheduled(
        "o-1", tracking_id="trk-o-1", carrier="orderflow-post"
    )
    assert at_ack.headers[context.FUNCTION] == FUNCTION
    assert at_ack.headers[context.CAUSATION_ID] == f"ORDERS:{seq}"
    assert at_ack.headers[context.EVENT_ID] == "delivery.scheduled:o-1"
    assert (info.num_pending, info.num_redelivered, delivered_to(info)) == (0, 0, seq)
    assert worker.counters.processed == 1 and worker.counters.failed == 0
    assert await kinds_of(nc, "o-1") == ["payments.succeeded", "delivery.scheduled"]


async def test_an_answer_stored_already_counts_as_stored_and_is_not_stored_twice(
    provisioned: Client, topology: Topology
) -> None:
    """A redelivery after a crash between publish and ack: the stream refuses the repeat
    (the order has that kind already), and the worker acks the input."""
    nc = provisioned
    first = DeliveryScheduled("o-7", tracking_id="trk-first", carrier="orderflow-post")
    await publish(nc, first)
    acks = await watch_acks(nc)

    async def handler(event: Event, history: History) -> Sequence[Event]:
        return [
            DeliveryScheduled(event.order_id, tracking_id="trk-again", carrier="orderflow-post")
        ]

    async with running(nc, topology, handler) as worker:
        seq = await publish(nc, paid("o-7"))
        await settled(nc, seq)
    assert acks.kinds() == ["+ACK"]
    stored = await read_subject(nc, "ORDERS", subjects.subject("delivery.scheduled", "o-7"))
    assert [msgspec.json.decode(s.data, type=DeliveryScheduled) for s in stored] == [first]
    assert worker.counters.processed == 1 and worker.counters.failed == 0


async def test_an_output_the_stream_refuses_leaves_the_input_unacked_and_it_is_tried_again(
    provisioned: Client, topology: Topology
) -> None:
    nc = provisioned
    topo = await reconciled(nc, tightened(topology, backoff=["300ms"]))
    acks = await watch_acks(nc)
    calls: list[float] = []
    too_big = "x" * (topology.limits.max_message_bytes + 1)  # over the stream's max_msg_size

    async def handler(event: Event, history: History) -> Sequence[Event]:
        calls.append(time.monotonic())
        tracking = too_big if len(calls) == 1 else "trk-ok"
        return [DeliveryScheduled(event.order_id, tracking_id=tracking, carrier="orderflow-post")]

    async with running(nc, topo, handler) as worker:
        seq = await publish(nc, paid("o-2"))
        await until(lambda: len(calls) == 2, 5.0, "tried again")
        info = await settled(nc, seq)
    # The refusal was not acked: handed back with the backoff's delay, then acked.
    assert acks.kinds() == ["-NAK", "+ACK"]
    assert acks.nak_delays() == [0.3]
    assert calls[1] - calls[0] >= 0.3 - 0.02
    assert info.num_redelivered == 0 and acked_to(info) == seq
    stored = await read_subject(nc, "ORDERS", subjects.subject("delivery.scheduled", "o-2"))
    assert [msgspec.json.decode(s.data, type=DeliveryScheduled).tracking_id for s in stored] == [
        "trk-ok"
    ]
    error = worker.counters.last_error or ""
    assert worker.counters.retried == 1 and error.startswith("Refused: ")
    assert "10054" in error  # JSStreamMessageExceedsMaximumErr
    assert worker.counters.dead_lettered == 0


async def test_a_failing_handler_is_retried_after_each_backoff_then_dead_lettered(
    provisioned: Client, topology: Topology
) -> None:
    nc = provisioned
    topo = await reconciled(nc, tightened(topology, backoff=["300ms", "600ms"], max_deliver=3))
    acks = await watch_acks(nc)
    calls: list[float] = []

    async def handler(event: Event, history: History) -> Sequence[Event]:
        calls.append(time.monotonic())
        raise RuntimeError("warehouse unreachable")

    async with running(nc, topo, handler) as worker:
        seq = await publish(nc, paid("o-3"))
        [letter] = await letters(nc, topo, 1, 5.0)
        await settled(nc, seq)
    # Three attempts, each after its delay: handed back with it, not redelivered at once.
    assert len(calls) == 3
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    for gap, planned in zip(gaps, (0.3, 0.6), strict=True):
        assert planned - 0.02 <= gap <= planned + 0.4, gaps
    assert acks.kinds() == ["-NAK", "-NAK", "+ACK"]  # the last one acked once dead-lettered
    assert acks.nak_delays() == [0.3, 0.6]
    assert (letter.function, letter.subject, letter.stream) == (
        FUNCTION,
        "order.o-3.payments.succeeded",
        "ORDERS",
    )
    assert (letter.sequence, letter.deliveries) == (seq, 3)
    assert letter.reason == "failed 3 attempts; last error: RuntimeError: warehouse unreachable"
    assert msgspec.json.decode(letter.data, type=PaymentSucceeded) == paid("o-3")
    assert worker.counters.retried == 2 and worker.counters.dead_lettered == 1
    # Every failed attempt but the last is noted in the retry log.
    assert topology.retry_log is not None
    notes = [
        msgspec.json.decode(s.data, type=RetryNote)
        for s in await read_stream(nc, topology.retry_log.stream)
    ]
    assert [(n.attempt, n.delay_s, n.sequence) for n in notes] == [(1, 0.3, seq), (2, 0.6, seq)]
    assert await kinds_of(nc, "o-3") == ["payments.succeeded"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff not json {", "payments.succeeded is not valid JSON"),
        (
            b'{"order_id":"o-4","amount_cents":-5,"charge_id":"ch"}',
            "invalid payments.succeeded: Expected `int` >= 0 - at `$.amount_cents`",
        ),
        (
            b'{"order_id":"o-other","amount_cents":5,"charge_id":"ch"}',
            "names order 'o-4' in its subject and 'o-other' in its payload",
        ),
    ],
    ids=["garbage", "invalid", "another-order"],
)
async def test_an_input_that_cannot_be_decoded_is_dead_lettered_at_once_unhandled(
    provisioned: Client, topology: Topology, data: bytes, reason: str
) -> None:
    nc = provisioned
    acks = await watch_acks(nc)
    calls: list[Event] = []

    async def handler(event: Event, history: History) -> Sequence[Event]:
        calls.append(event)
        return []

    async with running(nc, topology, handler):
        seq = await publish_raw(nc, "order.o-4.payments.succeeded", data)
        [letter] = await letters(nc, topology, 1, 5.0)
        await settled(nc, seq)
    assert calls == []
    assert acks.kinds() == ["+ACK"]  # not one retry
    assert (letter.deliveries, letter.sequence, letter.data) == (1, seq, data)
    assert reason in letter.reason, letter.reason
    assert await kinds_of(nc, "o-4") == ["payments.succeeded"]  # no rejection from delivery


async def _gives_up(event: Event, history: History) -> Sequence[Event]:
    raise Permanent("no warehouse serves this address")


async def _returns_undeclared(event: Event, history: History) -> Sequence[Event]:
    return [OrderCompleted(event.order_id, tracking_id="t")]


async def _appends_undeclared(event: Event, history: History) -> Sequence[Event]:
    await history.append(OrderCompleted(event.order_id, tracking_id="t"))
    return []


async def _reads_undeclared(event: Event, history: History) -> Sequence[Event]:
    await history.last(event.order_id, OrderCreated)
    return [DeliveryScheduled(event.order_id, tracking_id="t", carrier="orderflow-post")]


@pytest.mark.parametrize(
    ("bug", "reason"),
    [
        (_gives_up, "permanent failure: no warehouse serves this address"),
        (
            _returns_undeclared,
            "permanent failure: delivery emitted orders.completed, "
            "not in functions.delivery.emits (delivery.scheduled)",
        ),
        (
            _appends_undeclared,
            "permanent failure: delivery emitted orders.completed, "
            "not in functions.delivery.emits (delivery.scheduled)",
        ),
        (
            _reads_undeclared,
            "permanent failure: delivery read orders.created, "
            "not in functions.delivery.reads (payments.succeeded, stock.reserved)",
        ),
    ],
    ids=["permanent", "returns-undeclared", "appends-undeclared", "reads-undeclared"],
)
async def test_permanent_failures_and_undeclared_kinds_are_dead_lettered_at_once(
    provisioned: Client, topology: Topology, bug: Handler, reason: str
) -> None:
    nc = provisioned
    acks = await watch_acks(nc)
    calls = 0

    async def handler(event: Event, history: History) -> Sequence[Event]:
        nonlocal calls
        calls += 1
        return await bug(event, history)

    async with running(nc, topology, handler) as worker:
        seq = await publish(nc, paid("o-5"))
        [letter] = await letters(nc, topology, 1, 5.0)
        await settled(nc, seq)
    assert calls == 1 and acks.kinds() == ["+ACK"]  # at once, no retry
    assert (letter.deliveries, letter.reason) == (1, reason)
    assert worker.counters.retried == 0
    assert await kinds_of(nc, "o-5") == ["payments.succeeded"]  # nothing of it stored


async def test_a_message_delivered_more_than_max_deliver_is_dead_lettered_unhandled(
    provisioned: Client, topology: Topology
) -> None:
    nc = provisioned
    topo = await reconciled(nc, tightened(topology, max_deliver=2))
    seq = await publish(nc, paid("o-6"))
    # Two deliveries that never got an answer (a process dying on it, say).
    sub = await nc.jetstream().pull_subscribe_bind(DURABLE, "ORDERS")
    for attempt in (1, 2):
        [msg] = await sub.fetch(1, timeout=2.0)
        assert msg.metadata.num_delivered == attempt
        await msg.nak()
    await sub.unsubscribe()
    calls = 0

    async def handler(event: Event, history: History) -> Sequence[Event]:
        nonlocal calls
        calls += 1
        return []

    async with running(nc, topo, handler):
        [letter] = await letters(nc, topo, 1, 5.0)
        await settled(nc, seq)
    assert calls == 0
    assert letter.deliveries == 3
    assert letter.reason == "delivered 3 times (max_deliver 2) without an answer"


async def test_a_backlog_larger_than_the_window_drains_each_message_handled_once(
    provisioned: Client, topology: Topology
) -> None:
    nc = provisioned
    window = 4
    topo = await reconciled(nc, tightened(topology, backoff=["200ms"], concurrency=window))
    acks = await watch_acks(nc)
    ids = [f"o-b{i}" for i in range(20)]
    flaky = set(ids[::5])  # these fail their first attempt and come back after 200 ms
    attempts: collections.Counter[str] = collections.Counter()
    answered: collections.Counter[str] = collections.Counter()
    active = 0
    most = 0

    async def slow(event: Event, history: History) -> Sequence[Event]:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            attempts[event.order_id] += 1
            await asyncio.sleep(0.15)  # a slow handler: the backlog waits on the window
            if event.order_id in flaky and attempts[event.order_id] == 1:
                raise RuntimeError("try again")
            answered[event.order_id] += 1
            return [
                DeliveryScheduled(
                    event.order_id, tracking_id=f"trk-{event.order_id}", carrier="orderflow-post"
                )
            ]
        finally:
            active -= 1

    seqs = [await publish(nc, paid(order_id)) for order_id in ids]
    async with running(nc, topo, slow) as worker:
        info = await settled(nc, seqs[-1], timeout=10.0)
    assert answered == collections.Counter(ids)  # every one handled, once
    assert attempts == collections.Counter({i: 2 if i in flaky else 1 for i in ids})
    assert most == window  # the window filled, never more
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert collections.Counter(acks.kinds()) == {"+ACK": len(ids), "-NAK": len(flaky)}
    assert worker.counters.processed == len(ids) and worker.counters.dead_lettered == 0
    outputs = await read_stream(
        nc, "ORDERS", subjects=[subjects.subject("delivery.scheduled", "*")]
    )
    assert sorted(s.event().order_id for s in outputs) == sorted(ids)
