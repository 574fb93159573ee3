"""delivery: the join of paid and reserved schedules exactly once, whatever the arrival order."""

from __future__ import annotations

import asyncio

import pytest

from functions import delivery
from functions.events import DeliveryScheduled, Event, PaymentSucceeded, StockLine, StockReserved
from functions.state import MemoryStore
from tests.stores import InterleavingStore

PAID = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", [StockLine("BOOK-42", 2)])
SCHEDULED = DeliveryScheduled("o-1", tracking_id=delivery.tracking_id("o-1"))


async def feed(store: MemoryStore, *events: Event) -> list[list[Event]]:
    return [list(await delivery.handle(event, store)) for event in events]


def test_tracking_id_is_deterministic() -> None:
    assert delivery.tracking_id("o-1") == delivery.tracking_id("o-1")
    assert delivery.tracking_id("o-1") != delivery.tracking_id("o-2")
    assert delivery.tracking_id("o-1").startswith("TRK-")


@pytest.mark.parametrize(("first", "second"), [(PAID, RESERVED), (RESERVED, PAID)])
async def test_second_half_schedules_in_either_order(first: Event, second: Event) -> None:
    store = MemoryStore()
    assert await feed(store, first, second) == [[], [SCHEDULED]]


@pytest.mark.parametrize("again", [PAID, RESERVED])
async def test_redelivery_after_completion_repeats_the_same_event(again: Event) -> None:
    store = MemoryStore()
    await feed(store, PAID, RESERVED)
    assert await feed(store, again, again) == [[SCHEDULED], [SCHEDULED]]


@pytest.mark.parametrize("half", [PAID, RESERVED])
async def test_a_lone_half_emits_nothing(half: Event) -> None:
    store = MemoryStore()
    assert await feed(store, half, half) == [[], []]


async def test_concurrent_halves_schedule_once() -> None:
    store = InterleavingStore()
    results = await asyncio.gather(delivery.handle(PAID, store), delivery.handle(RESERVED, store))
    assert sorted(len(events) for events in results) == [0, 1]
    assert [e for events in results for e in events] == [SCHEDULED]
    assert store.conflicts >= 1  # both read the empty join: the race really happened
