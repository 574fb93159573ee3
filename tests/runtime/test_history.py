"""orderflow.runtime.history.OrderLog on a real server: the last event of a kind of an order,
read alone or many at once, from any replica or from the leader."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.client import Client

from functions.events import PaymentSucceeded, StockReserved, subject_of
from orderflow import subjects
from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.runtime.history import OrderLog


async def store(nc: Client, event: PaymentSucceeded | StockReserved) -> None:
    await nc.jetstream().publish(
        subjects.subject(subject_of(type(event)), event.order_id), msgspec.json.encode(event)
    )


async def test_reads_made_together_are_asked_in_one_request(provisioned: Client) -> None:
    ids = [f"o-{i}" for i in range(60)]
    for i, order_id in enumerate(ids):
        if i % 3:  # every third order has no charge yet
            await store(provisioned, PaymentSucceeded(order_id, 100 + i, charge_id=f"ch_{i}"))
    log = OrderLog(provisioned, "ORDERS", leader_only=False)
    sent = provisioned.stats["out_msgs"]
    found = await asyncio.gather(*(log.last(order_id, PaymentSucceeded) for order_id in ids))
    asked = provisioned.stats["out_msgs"] - sent
    for i, event in enumerate(found):
        if i % 3:
            assert event == PaymentSucceeded(ids[i], 100 + i, charge_id=f"ch_{i}")
        else:
            assert event is None
    # The first read goes out alone; the other 59, made meanwhile, go together.
    assert asked <= 3, asked


async def test_the_leaders_reads_find_the_same(provisioned: Client) -> None:
    await store(provisioned, PaymentSucceeded("o-1", 100, charge_id="ch_1"))
    log = OrderLog(provisioned, "ORDERS", leader_only=True)
    assert await log.last("o-1", PaymentSucceeded) == PaymentSucceeded("o-1", 100, "ch_1")
    assert await log.last("o-1", StockReserved) is None
    assert await log.last("o-2", PaymentSucceeded) is None


@pytest.mark.parametrize("leader_only", [False, True], ids=["direct", "leader"])
async def test_both_reads_see_the_schema_version_it_was_stored_with(
    provisioned: Client, leader_only: bool
) -> None:
    # The history decodes what it finds the way the runner decodes its input: by the
    # version in the stored message's headers (a bad one is named, not guessed at).
    js = provisioned.jetstream()
    paid = msgspec.json.decode(msgspec.json.encode(PaymentSucceeded("o-1", 100, "ch_1")))
    paid["added_by_a_newer_payment"] = True
    subject = subjects.subject("payments.succeeded", "o-1")
    headers = {SCHEMA_VERSION: "9", "Nats-Msg-Id": "first"}
    await js.publish(subject, msgspec.json.encode(paid), headers=headers)
    log = OrderLog(provisioned, "ORDERS", leader_only=leader_only)
    assert await log.last("o-1", PaymentSucceeded) == PaymentSucceeded("o-1", 100, "ch_1")
    reserved = subjects.subject("stock.reserved", "o-1")
    await js.publish(reserved, msgspec.json.encode(StockReserved("o-1", [])),
                     headers={SCHEMA_VERSION: "two", "Traceparent": "a:b"})  # fmt: skip
    with pytest.raises(ValueError, match=f"{SCHEMA_VERSION}: 'two' is not a schema version"):
        await log.last("o-1", StockReserved)
