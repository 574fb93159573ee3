"""Bounded input: limits in streams.yaml, checked at decode time, violations dead-lettered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client

from functions.events import OrderCreated, OrderItem, OrderRejected
from orderflow import config
from orderflow.config import ConfigError, Topology
from orderflow.limits import CEILINGS, Limits, check
from orderflow.runtime.decoding import Invalid, decode
from orderflow.tools.demo import payload
from orderflow.tools.dlq import DeadLetter
from orderflow.tools.streamlog import read_stream
from tests.conftest import StartFlow
from tests.flowkit import Flow, order

TIGHT = (
    ("max_items: 100", "max_items: 2"),
    ("max_quantity: 1000", "max_quantity: 5"),
    ("max_string_length: 64", "max_string_length: 16"),
)


def _order(
    items: int = 1, quantity: int = 1, customer: str = "c-7", sku: str = "BOOK-42"
) -> OrderCreated:
    lines = [OrderItem(sku, quantity, 1500) for _ in range(items)]
    return OrderCreated("lim-1", customer_id=customer, items=lines, payment_token="tok_visa")


def test_the_contract_sets_the_ceilings() -> None:
    assert CEILINGS == {"max_items": 100, "max_quantity": 1000, "max_string_length": 64}
    assert Limits() == Limits(**CEILINGS)  # the defaults: exactly the contract


def test_check_names_the_path_the_value_and_the_limit() -> None:
    tight = Limits(max_items=2, max_quantity=5, max_string_length=16)
    assert check(_order(items=2, quantity=5, customer="c" * 16), tight) is None
    assert check(_order(items=3), tight) == "$.items: 3 items, limit 2 (limits.max_items)"
    assert check(_order(quantity=6), tight) == (
        "$.items[0].quantity: 6, limit 5 (limits.max_quantity)"
    )
    assert check(_order(customer="c" * 17), tight) == (
        "$.customer_id: 17 characters, limit 16 (limits.max_string_length)"
    )
    assert check(_order(sku="S" * 20), tight) == (
        "$.items[0].sku: 20 characters, limit 16 (limits.max_string_length)"
    )
    # Decoding applies them after the contract's own checks; such an order is rejectable.
    data = payload(_order(items=3))
    invalid = decode("orders.created", data, {}, 65536, tight)
    assert invalid == Invalid(
        "orders.created over limits: $.items: 3 items, limit 2 (limits.max_items)"
    )
    assert isinstance(decode("orders.created", data, {}, 65536), OrderCreated)  # no limits given
    assert isinstance(decode("orders.created", data, {}, 65536, Limits()), OrderCreated)


def test_config_may_only_tighten_the_contract(variant_config: Callable[..., Path]) -> None:
    tight = config.load(variant_config(*TIGHT)).limits
    assert (tight.max_items, tight.max_quantity, tight.max_string_length) == (2, 5, 16)

    def error(*replacement: tuple[str, str]) -> str:
        with pytest.raises(ConfigError) as caught:
            config.load(variant_config(*replacement))
        return str(caught.value)

    assert error(("max_items: 100", "max_items: 120")).endswith(
        "limits.max_items: 120 exceeds the contract's bound 100 (functions/events.py); "
        "limits may only tighten it"
    )
    assert "limits.max_quantity: 5000 exceeds the contract's bound 1000" in error(
        ("max_quantity: 1000", "max_quantity: 5000")
    )
    assert "limits.max_message_bytes: 4096 is below dead_letters.max_payload (65536)" in error(
        ("max_message_bytes: 131072", "max_message_bytes: 4096")
    )
    assert "Expected `int` >= 1 - at `$.limits.max_items`" in error(
        ("max_items: 100", "max_items: 0")
    )
    assert "unknown field `max_itmes`" in error(("max_items: 100", "max_itmes: 100"))


def _readers(flow: Flow) -> set[str]:
    """The functions that consume orders.created: each dead-letters an invalid one."""
    return {
        name
        for name, fn in flow.topology.functions.items()
        if any("orders.created" in c.events for c in fn.consumers)
    }


async def _letters(flow: Flow, seq: int) -> list[DeadLetter]:
    for _ in range(200):
        found = [d for d in await flow.dead_letters() if d.sequence == seq]
        if len(found) == len(_readers(flow)):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {len(_readers(flow))} dead letters for seq {seq}")


async def test_orders_over_the_limits_are_dead_lettered_and_rejected(
    start_flow: StartFlow, variant_config: Callable[..., Path]
) -> None:
    flow = await start_flow(config_path=variant_config(*TIGHT))
    pids = {name: flow.supervisor.pids(name) for name in flow.topology.functions}
    js = flow.nc.jetstream()
    over = {
        "lim-items": (order("lim-items", BOOK_42=1, MUG_7=1, PEN_3=1),
                      "$.items: 3 items, limit 2 (limits.max_items)"),
        "lim-qty": (order("lim-qty", BOOK_42=6),
                    "$.items[0].quantity: 6, limit 5 (limits.max_quantity)"),
        "lim-long-order-id": (order("lim-long-order-id"),
                              "$.order_id: 17 characters, limit 16 (limits.max_string_length)"),
    }  # fmt: skip
    seqs = {}
    for order_id, (o, _) in over.items():
        seqs[order_id] = (await js.publish("orders.created", payload(o))).seq
    await flow.publish(order("lim-ok", BOOK_42=5, MUG_7=1))

    for order_id, (_, reason) in over.items():
        letters = await _letters(flow, seqs[order_id])
        assert {d.function for d in letters} == _readers(flow) == {"payment", "stock"}
        assert {d.reason for d in letters} == {f"orders.created over limits: {reason}"}
        assert all(d.deliveries == 1 for d in letters)  # at once, no retries
    seen = await flow.wait_finished(["lim-ok"])
    assert "orders.completed" in seen["lim-ok"]
    rejected = [s.event() for s in await flow.events() if s.kind == "orders.rejected"]
    assert sorted(rejected, key=lambda r: r.order_id) == sorted(
        (OrderRejected(oid, f"orders.created over limits: {r}") for oid, (_, r) in over.items()),
        key=lambda r: r.order_id,
    )
    # Nothing else happened for them, and no function process died.
    for order_id in over:
        assert seen[order_id] == ["orders.created", "orders.rejected"]
    assert {name: flow.supervisor.pids(name) for name in flow.topology.functions} == pids


async def test_streams_refuse_messages_over_max_message_bytes(
    provisioned: Client, topology: Topology
) -> None:
    js = provisioned.jetstream()
    orders = await js.stream_info("ORDERS")
    assert orders.config.max_msg_size == topology.limits.max_message_bytes == 131072
    assert (await js.stream_info("DEAD_LETTERS")).config.max_msg_size == -1
    # Over dead_letters.max_payload but within max_message_bytes: stored (to be dead-lettered).
    await js.publish("orders.created", b"x" * 100_000)
    with pytest.raises(nats.js.errors.APIError, match="message size exceeds maximum allowed"):
        await js.publish("orders.created", b"x" * 131_073)
    stored = await read_stream(provisioned, "ORDERS")
    assert [len(s.data) for s in stored] == [100_000]
