"""The order as an addressable history: subjects carry the order id, and the log is the state.

What the layout promises (orderflow/subjects.py): every event of an order is
found under ``order.<ID>.``; ingress stays the payload-only ``orders.created``
and may also come under its id (which must match the payload's); an id that
cannot be a subject token is rejected with a reason; each order has each kind
of event once, by the stream's own check, however late a repeat comes; and a
server holding the old layout is refused, not silently taken over.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from functions.events import OrderRejected
from orderflow import subjects
from orderflow.config import Topology
from orderflow.ops.provision import LayoutRefused, provision
from orderflow.ops.server import EmbeddedServer
from orderflow.runtime.emit import EXPECTED_LAST_SUBJECT_SEQUENCE
from orderflow.tools.demo import payload
from orderflow.tools.streamlog import read_stream, read_subject
from tests.conftest import ROOT, StartFlow
from tests.flowkit import order, terminal_counts


def test_subjects_carry_the_order_and_parse_back() -> None:
    assert subjects.subject("payments.succeeded", "o-1") == "order.o-1.payments.succeeded"
    assert subjects.parse("order.o-1.payments.succeeded") == ("o-1", "payments.succeeded")
    assert subjects.parse("orders.created") == (None, "orders.created")
    assert subjects.subject("saga.timeout", "o-1") == "timer.o-1.saga.timeout"
    assert subjects.filters("orders.created") == ["orders.created", "order.*.orders.created"]
    # An id that cannot be a token is never one: only its rejection is stored, under "_".
    assert subjects.subject("orders.rejected", "a.b") == "order._.orders.rejected"
    assert not subjects.safe("o 1") and not subjects.safe("o*") and subjects.safe("o-1_A")


async def test_an_order_published_under_its_id_runs_and_a_mismatch_is_rejected(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow()
    js = flow.nc.jetstream()
    await js.publish("order.lay-1.orders.created", payload(order("lay-1")))
    await js.publish("order.lay-2.orders.created", payload(order("lay-3")))  # says lay-3
    await flow.wait_finished(["lay-1"], timeout=30)
    await flow.wait_quiet()
    seen = await flow.by_order()
    assert terminal_counts(seen, ["lay-1"]) == {"lay-1": 1}
    assert "orders.completed" in seen["lay-1"]
    # The mismatch: filed under the subject's order, rejected with the reason,
    # dead-lettered by both readers of orders.created, nothing else done.
    [rejection] = await read_subject(flow.nc, "ORDERS", "order.lay-2.orders.rejected")
    event = rejection.event()
    assert isinstance(event, OrderRejected) and event.order_id == "lay-2"
    reason = event.reason
    assert "names order 'lay-2' in its subject and 'lay-3' in its payload" in reason
    assert "lay-3" not in {stored.event().order_id for stored in await flow.events()
                           if stored.kind != "orders.created"}  # fmt: skip
    letters = [d for d in await flow.dead_letters() if d.subject == "order.lay-2.orders.created"]
    assert sorted(d.function for d in letters) == ["payment", "stock"]
    assert [s.kind for s in await read_subject(flow.nc, "ORDERS", "order.lay-2.>")] == [
        "orders.created",
        "orders.rejected",
    ]


async def test_an_order_id_that_cannot_be_a_subject_token_is_rejected(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow()
    bad = msgspec.json.encode(
        {
            "order_id": "o.1 *",
            "customer_id": "c",
            "payment_token": "tok_visa",
            "items": [{"sku": "BOOK-42", "quantity": 1, "unit_price_cents": 100}],
        }
    )
    await flow.nc.publish("orders.created", bad)
    await flow.nc.flush()
    await flow.wait_quiet()
    [stored] = await read_subject(flow.nc, "ORDERS", "order._.orders.rejected")
    rejection = stored.event()
    assert isinstance(rejection, OrderRejected)
    assert rejection.order_id == "o.1 *"
    assert "$.order_id" in rejection.reason
    letters = await flow.dead_letters()
    assert sorted(d.function for d in letters) == ["payment", "stock"]
    assert {d.headers.get("Orderflow-Dlq-Subject") for d in letters} == {"orders.created"}


async def test_the_stream_itself_refuses_a_second_event_of_a_kind(provisioned: Client) -> None:
    # What makes a redelivery days later harmless: not a duplicate window, the
    # subject's own last sequence.
    js = provisioned.jetstream()
    subject = subjects.subject("delivery.scheduled", "lay-9")
    body = b'{"type":"delivery.scheduled","order_id":"lay-9","tracking_id":"TRK-1"}'
    guard = {EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}
    await js.publish(subject, body, headers=guard)
    reply = await provisioned.request(subject, body, headers=guard, timeout=2)
    assert msgspec.json.decode(reply.data)["error"]["err_code"] == 10071
    assert len(await read_subject(provisioned, "ORDERS", subject)) == 1


async def test_provision_refuses_a_server_holding_the_old_layout(
    server: EmbeddedServer, nc: Client, topology: Topology
) -> None:
    js = nc.jetstream()
    old = ["orders.>", "payments.>", "stock.>", "delivery.>"]
    await js.add_stream(StreamConfig(name="ORDERS", subjects=old))
    await js.publish("payments.succeeded", b'{"order_id":"old-1"}')
    await js.publish("orders.completed", b'{"order_id":"old-1"}')
    with pytest.raises(LayoutRefused) as refused:
        await provision(nc, topology, ROOT)
    message = str(refused.value)
    assert "stream ORDERS holds 2 messages" in message
    assert "orders.completed" in message and "payments.succeeded" in message
    assert "nats stream rm ORDERS" in message and "--data-dir" in message
    # Nothing was changed: the old stream and its messages are as they were.
    info = await js.stream_info("ORDERS")
    assert info.config.subjects == old and info.state.messages == 2
    assert len(await read_stream(nc, "ORDERS")) == 2

    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "runner.py"), "provision"],
        env={**os.environ, "NATS_URL": server.url}, cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "older layout" in out.stderr and "Traceback" not in out.stderr
