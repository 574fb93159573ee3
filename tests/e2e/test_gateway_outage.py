"""A charge whose outcome is unknown: the gateway does not answer for longer than
every retry and deadline, then answers again.

In both modes the order waits visibly, held by exactly one dead letter (its
charge), never by a message sent again and again; ``stuck`` and ``trace`` name
the payment step and that dead letter; redriving it once the gateway answers
ends the order exactly once, the charge taken at most once and kept only if
the order completed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from functions.events import OrderCreated
from orderflow import config
from orderflow.runtime.decoding import readable_order_id
from orderflow.runtime.gateway import DOWN_TOKEN, SimulatedGateway
from orderflow.runtime.kv import KvStore
from orderflow.tools import trace
from orderflow.tools.dlq import DeadLetter, redrive
from tests.conftest import StartFlow
from tests.flowkit import Flow, gateway_records, order, terminal_counts

# Short enough that the whole outage (retries, then several deadlines) fits in
# seconds; the same shape as streams.yaml's.
SHORTER = (
    ("backoff: [200ms, 1s, 5s, 15s]", "backoff: [100ms, 200ms]"),
    ("max_deliver: 8", "max_deliver: 3"),
    ("payment: {timeout: 30s, on_timeout: wait}", "payment: {timeout: 1s, on_timeout: wait}"),
    ("stock: {timeout: 30s,", "stock: {timeout: 1s,"),
    ("delivery: {timeout: 30s,", "delivery: {timeout: 1s,"),
    ("release: {timeout: 30s,", "release: {timeout: 1s,"),
    ("refund: {timeout: 30s,", "refund: {timeout: 1s,"),
)

CASES = [
    # (mode, the order, how it must end once the charge is redriven)
    ("choreography", order("out-1", token=DOWN_TOKEN), "orders.completed"),
    ("choreography", order("out-2", token=DOWN_TOKEN, SOLD_OUT_1=1), "orders.cancelled"),
    ("orchestration", order("out-3", token=DOWN_TOKEN), "orders.completed"),
    ("orchestration", order("out-4", token=DOWN_TOKEN, SOLD_OUT_1=1), "orders.cancelled"),
]


async def _held(flow: Flow, order_id: str) -> list[DeadLetter]:
    return [d for d in await flow.dead_letters() if readable_order_id(d.data) == order_id]


async def _letters_for(flow: Flow, order_id: str) -> list[int]:
    return [d.id for d in await _held(flow, order_id)]


@pytest.mark.parametrize(("mode", "placed", "ending"), CASES, ids=[c[1].order_id for c in CASES])
async def test_an_unknown_charge_waits_in_one_dead_letter_and_a_redrive_ends_it_once(
    start_flow: StartFlow,
    variant_config: Callable[..., Path],
    mode: config.Mode,
    placed: OrderCreated,
    ending: str,
) -> None:
    flow = await start_flow(config_path=variant_config(*SHORTER), mode=mode)
    order_id = placed.order_id
    await flow.publish(placed)

    # The charge runs out of retries (0.1 + 0.2 s) and is dead-lettered.
    for _ in range(100):
        if await _letters_for(flow, order_id):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the charge was never dead-lettered")
    # Then the outage goes on past every deadline (1 s, three attempts) and
    # every retry: nothing more may be dead-lettered or sent for it.
    await asyncio.sleep(4.0)
    letters = await _letters_for(flow, order_id)
    assert len(letters) == 1, await flow.dead_letters()
    seen = await flow.by_order()
    assert terminal_counts(seen, [order_id]) == {order_id: 0}
    assert seen[order_id].count("saga.payment.charge") <= 1  # never sent again
    assert seen[order_id].count("saga.payment.refund") == 0
    assert await gateway_records(flow, "charge") == {}

    # What an operator sees: the payment step, held by that dead letter.
    [found] = (await trace.load(flow.nc, flow.topology, {order_id})).values()
    [owed] = [o for o in found.owed if o.function == "payment"]
    assert [d.fields["id"] for d in owed.held_by] == letters
    text = trace.render(found, datetime.now(UTC))
    assert f"HELD by dead letter {letters[0]}" in text
    assert f"dlq redrive {letters[0]}" in text

    # The gateway answers again; the one dead letter is redriven (and so removed).
    await SimulatedGateway(KvStore(flow.nc, "gateway")).restore()
    await redrive(flow.nc, flow.topology, await _held(flow, order_id))
    seen = await flow.wait_finished([order_id], timeout=30)
    await flow.wait_quiet()
    seen = await flow.by_order()
    assert terminal_counts(seen, [order_id]) == {order_id: 1}
    assert ending in seen[order_id]
    assert await _letters_for(flow, order_id) == []  # nothing new dead-lettered

    # The charge was taken once, and kept only if the order completed.
    charges = await gateway_records(flow, "charge")
    refunds = await gateway_records(flow, "refund")
    assert len(charges) == 1
    assert len(refunds) == (0 if ending == "orders.completed" else 1)
    if ending == "orders.cancelled":
        assert {"payments.succeeded", "payments.refunded"} <= set(seen[order_id])
    await flow.assert_stock_conserved()
