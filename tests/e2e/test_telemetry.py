"""Traces that leave the process: every function's spans over OTLP, one tree per order.

Every function runs as its own OS process and exports its spans over OTLP/HTTP
to a receiver in the test (``bench/otlp.py``), which decodes the exporter's
real protobuf; each order's spans must form one tree in one trace whose links
are the log's causes, in both modes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator

import msgspec
import pytest

from bench.otlp import OtlpReceiver, ReceivedSpan
from functions.events import AnyOrderId, CancelRequest
from orderflow import subjects
from orderflow.config import Topology
from orderflow.ops import interventions
from orderflow.runtime import context as ctx
from orderflow.tools.streamlog import Stored
from tests.conftest import StartFlow
from tests.flowkit import BaseFlow, order
from tests.waiting import until

#: The spans come quickly (every 50 ms) unless a test says otherwise.
OTEL_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    # Only what the test sets: a developer's own OTEL_* must not reach the processes.
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    with OtlpReceiver() as r:
        yield r


def _order_of(stored: Stored) -> str:
    return msgspec.json.decode(stored.data, type=AnyOrderId).order_id


async def _events_by_order(flow: BaseFlow, ids: list[str]) -> dict[str, list[Stored]]:
    found: dict[str, list[Stored]] = defaultdict(list)
    for stored in await flow.events():
        with_id = subjects.parse(stored.subject)[0] or _order_of(stored)
        if with_id in ids:
            found[with_id].append(stored)
    return found


def _span_hex(stored: Stored) -> str:
    carried = ctx.traceparent_of(stored.headers)
    assert carried is not None, stored
    return carried[1]


def assert_one_tree_by_causation(
    order_id: str, events: list[Stored], spans: list[ReceivedSpan], topology: Topology
) -> dict[str, list[ReceivedSpan]]:
    """The spans of one order: one trace, one root (its ingress), every parent present, each
    event's send span where its traceparent says, under the process span of its cause.
    Returns the process spans by function."""
    created, emitted = events[0], events[1:]
    assert created.subject == subjects.INGRESS and not created.headers  # like `nats pub`
    ingress_id = f"{topology.events_stream}:{created.sequence}"
    trace_id = ctx.trace_id({}, order_id)
    mine = [s for s in spans if s.attributes.get("messaging.message.conversation_id") == order_id]
    assert {s.trace_id for s in mine} == {trace_id}, "one order, one trace"
    by_id = {s.span_id: s for s in mine}
    assert len(by_id) == len(mine), "no two spans share an id"

    [root] = [s for s in mine if not s.parent_id]
    assert (root.name, root.kind) == ("send orders.created", "PRODUCER")
    assert root.span_id == ctx.span_id(ingress_id)
    assert root.attributes["messaging.message.id"] == ingress_id
    assert root.start_ns == root.end_ns  # the moment the stream stored it
    for s in mine:
        assert s.parent_id == "" or s.parent_id in by_id, f"{s.name}: parent missing"
        assert s.attributes["messaging.system"] == "nats"

    consumes = {
        n: {k for c in fn.consumers for k in c.events} for n, fn in topology.functions.items()
    }
    process = [s for s in mine if s.kind == "CONSUMER"]
    by_function: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for p in process:
        function = p.attributes["orderflow.function"]
        by_function[function].append(p)
        assert p.service == subjects.service(function)
        assert p.name == f"process {p.attributes['messaging.destination.template']}"
        kind = subjects.kind_of(p.attributes["messaging.destination.name"])
        assert kind in consumes[function]
        durables = {c.durable for c in topology.functions[function].consumers}
        assert p.attributes["messaging.consumer.group.name"] in durables

    # Every event an order's functions stored: its send span, by its derived id, under
    # the process span of the message that caused it, which in turn hangs under that
    # message's own send span (or the ingress root): the tree is the log's causation.
    ids_here = {ingress_id: created} | {e.headers[ctx.EVENT_ID]: e for e in emitted}
    for e in emitted:
        send = by_id.get(_span_hex(e))
        assert send is not None, f"no span for {e.kind} (stored at {e.sequence})"
        function = e.headers[ctx.FUNCTION]
        assert (send.kind, send.service) == ("PRODUCER", subjects.service(function))
        assert send.attributes["messaging.destination.name"] == e.subject
        assert send.attributes["messaging.destination.template"] == f"order.{{order_id}}.{e.kind}"
        assert send.attributes["messaging.message.id"] == e.headers[ctx.EVENT_ID]
        assert send.attributes["orderflow.stream_sequence"] == e.sequence
        cause_span = by_id[send.parent_id]
        assert cause_span.kind == "CONSUMER"
        assert cause_span.attributes["orderflow.function"] == function
        cause = ids_here[e.headers[ctx.CAUSATION_ID]]
        assert cause_span.attributes["messaging.message.id"] == e.headers[ctx.CAUSATION_ID]
        expected_parent = root.span_id if cause is created else _span_hex(cause)
        assert cause_span.parent_id == expected_parent
    return by_function


def _complete(spans: list[ReceivedSpan], events: dict[str, list[Stored]]) -> bool:
    """Whether every event stored for these orders has its send span, and every span received
    its parent (the processes export on their own schedules)."""
    ids = {s.span_id for s in spans}
    sent = all(_span_hex(e) in ids for stored in events.values() for e in stored[1:])
    return sent and all(s.parent_id in ids for s in spans if s.parent_id)


async def _when_complete(
    flow: BaseFlow, receiver: OtlpReceiver, ids: list[str]
) -> tuple[list[ReceivedSpan], dict[str, list[Stored]]]:
    events = await _events_by_order(flow, ids)
    await until(lambda: _complete(receiver.snapshot(), events), 30, "every order's spans")
    return receiver.snapshot(), events


async def test_an_order_is_one_trace_whose_tree_is_its_causes(
    start_flow: StartFlow, receiver: OtlpReceiver
) -> None:
    flow = await start_flow(env={**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    orders = [
        order("tel-happy"),
        order("tel-flaky", token="tok_flaky"),  # a retry
        order("tel-oos", BOOK_42=1, SOLD_OUT_1=1),  # a compensation: the refund
    ]
    await flow.publish(*orders)
    # Invalid (no items): dead-lettered by payment and stock, answered on orders.rejected.
    await flow.nc.publish(subjects.INGRESS, b'{"order_id":"tel-bad","customer_id":"c-7",'
                          b'"items":[],"payment_token":"tok_visa"}')  # fmt: skip
    ids = [o.order_id for o in orders]
    await flow.wait_finished(ids, timeout=30)
    await flow.wait_quiet()  # the invalid order's dead letters and rejection too
    spans, events = await _when_complete(flow, receiver, [*ids, "tel-bad"])
    trees = {i: assert_one_tree_by_causation(i, events[i], spans, flow.topology) for i in ids}

    happy = trees["tel-happy"]
    assert set(happy) == {"payment", "stock", "delivery", "order"}  # every function's spans
    assert not any(s.error for fn in happy.values() for s in fn)

    # The flaky charge: its first attempt is an error with a retry event, the second is not.
    charges = sorted(
        (s for s in trees["tel-flaky"]["payment"]
         if s.attributes["messaging.destination.name"] == subjects.INGRESS),
        key=lambda s: s.attributes["orderflow.attempt"],
    )  # fmt: skip
    assert [s.attributes["orderflow.attempt"] for s in charges] == [1, 2]
    assert charges[0].error and charges[0].attributes["error.type"] == "GatewayUnavailable"
    [(name, retry)] = charges[0].events
    assert name == "retry" and retry["exception.type"] == "GatewayUnavailable"
    assert not charges[1].error and not charges[1].events

    # Out of stock: the process span that refunded says so.
    refunds = [s for s in trees["tel-oos"]["payment"] if "compensation" in s.event_names()]
    assert [dict(s.events)["compensation"] for s in refunds] == [
        {"orderflow.kind": "payments.refunded"}
    ]

    # The invalid order: dead-lettered by both readers (error.type from the reason),
    # rejected by payment, in the same trace.
    bad = [s for s in spans if s.attributes.get("messaging.message.conversation_id") == "tel-bad"]
    dead = [s for s in bad if "dead_letter" in s.event_names()]
    assert sorted(s.attributes["orderflow.function"] for s in dead) == ["payment", "stock"]
    assert {s.attributes["error.type"] for s in dead} == {"invalid"}
    [rejected] = [e for e in events["tel-bad"] if e.kind == "orders.rejected"]
    send = next(s for s in bad if s.span_id == _span_hex(rejected))
    assert send.parent_id in {s.span_id for s in dead}
    assert {s.trace_id for s in bad} == {ctx.trace_id({}, "tel-bad")}


async def test_orchestrated_order_is_one_trace_sent_when_its_processes_stop(
    start_flow: StartFlow, receiver: OtlpReceiver
) -> None:
    # Batches every 10 minutes: nothing is exported before the processes stop, so every
    # span that arrives was sent by the flush on the way out.
    env = {"OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    flow = await start_flow(env=env, mode="orchestration")
    orders = [order("tel-saga"), order("tel-saga-oos", BOOK_42=1, SOLD_OUT_1=1)]
    await flow.publish(*orders)
    ids = [o.order_id for o in orders]
    await flow.wait_finished(ids, timeout=30)
    await flow.wait_quiet()
    assert receiver.requests == 0
    await flow.stop()  # SIGTERM: each process drains, then sends what it buffered
    spans, events = await _when_complete(flow, receiver, ids)
    trees = {i: assert_one_tree_by_causation(i, events[i], spans, flow.topology) for i in ids}
    assert set(trees["tel-saga"]) == {"orchestrator", "payment", "stock", "delivery"}
    # The orchestrator's alarms are sent too (a scheduled message, then its withdrawal).
    alarms = [s for s in spans if s.name == "send timer.{order_id}.alarm"]
    assert {s.attributes["messaging.message.conversation_id"] for s in alarms} == set(ids)
    # Out of stock: the orchestrator commands the refund, payment refunds; both say so.
    oos = trees["tel-saga-oos"]
    compensations = {
        (fn, dict(s.events)["compensation"]["orderflow.kind"])
        for fn, spans_of in oos.items() for s in spans_of if "compensation" in s.event_names()
    }  # fmt: skip
    assert compensations == {("orchestrator", "saga.payment.refund"),
                             ("payment", "payments.refunded")}  # fmt: skip


async def test_a_cancellation_is_a_root_of_its_own_in_the_orders_trace(
    start_flow: StartFlow, receiver: OtlpReceiver
) -> None:
    # Delivery held: paid and reserved, the order waits for a cancellation.
    env = {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    flow = await start_flow({"delivery": 0}, env=env)
    await flow.publish(order("tel-cancel"))

    async def held() -> bool:
        seen = set((await flow.by_order()).get("tel-cancel", []))
        return {"payments.succeeded", "stock.reserved"} <= seen

    await until(held, 20, "paid and reserved")
    request = CancelRequest("tel-cancel", reason="changed my mind", requested_by="ann")
    answer = await interventions.cancel(flow.nc, flow.topology, request, attempts=20, timeout=2.0)
    assert answer.answer == "accepted"
    await flow.wait_finished(["tel-cancel"], timeout=30)
    events = await _events_by_order(flow, ["tel-cancel"])

    def mine() -> list[ReceivedSpan]:
        conversation = "messaging.message.conversation_id"
        return [s for s in receiver.snapshot() if s.attributes.get(conversation) == "tel-cancel"]

    def complete() -> bool:
        ids = {s.span_id for s in mine()}
        return all(_span_hex(e) in ids for e in events["tel-cancel"][1:]) and all(
            s.parent_id in ids for s in mine() if s.parent_id
        )

    await until(complete, 30, "the order's spans")
    spans = mine()
    assert {s.trace_id for s in spans} == {ctx.trace_id({}, "tel-cancel")}, "one trace"
    by_id = {s.span_id: s for s in spans}
    roots = sorted(s.name for s in spans if not s.parent_id)
    assert roots == ["process orders.cancel", "send orders.created"]
    [asked] = [s for s in spans if s.name == "process orders.cancel"]
    assert asked.service == subjects.service("cancel")
    # What the request stored hangs under it; what that caused, under that.
    [closed] = [e for e in events["tel-cancel"] if e.kind == "delivery.cancelled"]
    send = by_id[_span_hex(closed)]
    assert (send.kind, send.parent_id) == ("PRODUCER", asked.span_id)
    refund = [s for s in spans if s.kind == "CONSUMER" and s.parent_id == send.span_id]
    assert [s.attributes["orderflow.function"] for s in refund] == ["payment"]
