"""stock: all-or-none reservations, releases after a failed payment, idempotent redelivery."""

from __future__ import annotations

import asyncio

import pytest

from functions import stock
from functions.errors import Retry
from functions.events import (
    OrderCreated,
    OrderItem,
    PaymentFailed,
    Shortage,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
)
from functions.state import MemoryStore, Write
from functions.stock import Level, Reservation, decide_release, decide_reservation, events_for
from tests.stores import InterleavingStore


def order(order_id: str, *lines: tuple[str, int]) -> OrderCreated:
    items = [OrderItem(sku, quantity, 100) for sku, quantity in lines]
    return OrderCreated(order_id, "c-1", items, payment_token="tok_visa")


def declined(order_id: str) -> PaymentFailed:
    return PaymentFailed(order_id, 100, reason="card_declined")


async def stocked(**levels: int) -> MemoryStore:
    store = MemoryStore()
    for sku, available in levels.items():
        assert await store.commit(Write(stock.level_key(sku), Level(available), 0))
    return store


async def level(store: MemoryStore, sku: str) -> int:
    found = await store.get(stock.level_key(sku), Level)
    assert found is not None
    return found.value.available


# --- pure decisions -----------------------------------------------------------


def test_decide_reservation_takes_everything() -> None:
    reservation, levels = decide_reservation(order("o-1", ("A", 2), ("B", 1)), {"A": 5, "B": 1})
    assert reservation == Reservation("reserved", items=[StockLine("A", 2), StockLine("B", 1)])
    assert levels == {"A": 3, "B": 0}


def test_decide_reservation_takes_nothing_when_one_sku_is_short() -> None:
    reservation, levels = decide_reservation(order("o-1", ("A", 2), ("B", 3)), {"A": 5, "B": 1})
    assert reservation == Reservation("unavailable", shortages=[Shortage("B", 3, 1)])
    assert levels == {}


def test_decide_reservation_unknown_sku_has_nothing() -> None:
    reservation, _ = decide_reservation(order("o-1", ("GHOST", 1)), {})
    assert reservation.shortages == [Shortage("GHOST", 1, 0)]


def test_decide_reservation_aggregates_duplicate_skus() -> None:
    reservation, levels = decide_reservation(order("o-1", ("A", 2), ("A", 3)), {"A": 5})
    assert reservation.items == [StockLine("A", 5)]
    assert levels == {"A": 0}
    short, _ = decide_reservation(order("o-1", ("A", 2), ("A", 3)), {"A": 4})
    assert short.shortages == [Shortage("A", 5, 4)]


def test_decide_release() -> None:
    held = Reservation("reserved", items=[StockLine("A", 2)])
    assert decide_release(held, {"A": 1}) == (Reservation("released", items=held.items), {"A": 3})
    for final in ("released", "unavailable"):
        assert decide_release(Reservation(final), {}) == (None, {})


def test_events_for() -> None:
    lines = [StockLine("A", 2)]
    reserved, released = Reservation("reserved", lines), Reservation("released", lines)
    unavailable = Reservation("unavailable", shortages=[Shortage("A", 2, 0)])
    assert events_for("o-1", reserved, OrderCreated) == [StockReserved("o-1", lines)]
    assert events_for("o-1", released, OrderCreated) == [StockReserved("o-1", lines)]
    assert events_for("o-1", unavailable, OrderCreated) == [
        StockUnavailable("o-1", [Shortage("A", 2, 0)])
    ]
    assert events_for("o-1", released, PaymentFailed) == [StockReleased("o-1", lines)]
    assert events_for("o-1", unavailable, PaymentFailed) == []
    assert events_for("o-1", reserved, PaymentFailed) == []


# --- the handler ----------------------------------------------------------------


async def test_reserves_all_and_decrements_levels() -> None:
    store = await stocked(A=5, B=2)
    events = await stock.handle(order("o-1", ("A", 2), ("B", 2)), store)
    assert events == [StockReserved("o-1", [StockLine("A", 2), StockLine("B", 2)])]
    assert (await level(store, "A"), await level(store, "B")) == (3, 0)


async def test_one_short_sku_reserves_none() -> None:
    store = await stocked(A=5, B=1)
    events = await stock.handle(order("o-1", ("A", 2), ("B", 3)), store)
    assert events == [StockUnavailable("o-1", [Shortage("B", requested=3, available=1)])]
    assert (await level(store, "A"), await level(store, "B")) == (5, 1)


async def test_duplicate_sku_lines_are_aggregated() -> None:
    store = await stocked(A=5)
    events = await stock.handle(order("o-1", ("A", 2), ("A", 3)), store)
    assert events == [StockReserved("o-1", [StockLine("A", 5)])]
    assert await level(store, "A") == 0


async def test_redelivered_order_is_reserved_once() -> None:
    store = await stocked(A=5)
    created = order("o-1", ("A", 2))
    first = await stock.handle(created, store)
    again = await stock.handle(created, store)
    assert first == again == [StockReserved("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 3


async def test_failed_payment_releases_the_reservation() -> None:
    store = await stocked(A=5, B=2)
    await stock.handle(order("o-1", ("A", 2), ("B", 1)), store)
    events = await stock.handle(declined("o-1"), store)
    assert events == [StockReleased("o-1", [StockLine("A", 2), StockLine("B", 1)])]
    assert (await level(store, "A"), await level(store, "B")) == (5, 2)


async def test_redelivered_failed_payment_releases_once() -> None:
    store = await stocked(A=5)
    await stock.handle(order("o-1", ("A", 2)), store)
    first = await stock.handle(declined("o-1"), store)
    again = await stock.handle(declined("o-1"), store)
    assert first == again == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5


async def test_failed_payment_before_the_order_waits_for_it() -> None:
    store = await stocked(A=5)
    # Nothing decided yet for o-1: retry later rather than guess.
    with pytest.raises(Retry):
        await stock.handle(declined("o-1"), store)
    assert await level(store, "A") == 5
    # Once the order is handled, the retried failure releases it: the same
    # outcome as in the usual arrival order.
    assert await stock.handle(order("o-1", ("A", 2)), store) == [
        StockReserved("o-1", [StockLine("A", 2)])
    ]
    assert await stock.handle(declined("o-1"), store) == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5


async def test_failed_payment_for_an_unavailable_order_emits_nothing() -> None:
    store = await stocked(A=1)
    await stock.handle(order("o-1", ("A", 2)), store)
    assert await stock.handle(declined("o-1"), store) == []
    assert await level(store, "A") == 1


async def test_concurrent_orders_for_the_last_units_reserve_once() -> None:
    store = InterleavingStore()
    assert await store.commit(Write(stock.level_key("A"), Level(3), 0))
    results = await asyncio.gather(
        stock.handle(order("o-1", ("A", 2)), store),
        stock.handle(order("o-2", ("A", 2)), store),
    )
    kinds = sorted(type(events[0]).__name__ for events in results)
    assert kinds == ["StockReserved", "StockUnavailable"]
    assert store.conflicts >= 1  # the two really raced
    assert await level(store, "A") == 1


async def test_redelivery_racing_the_original_reserves_once() -> None:
    store = InterleavingStore()
    assert await store.commit(Write(stock.level_key("A"), Level(5), 0))
    created = order("o-1", ("A", 2))
    first, second = await asyncio.gather(stock.handle(created, store), stock.handle(created, store))
    assert first == second == [StockReserved("o-1", [StockLine("A", 2)])]
    assert store.conflicts >= 1
    assert await level(store, "A") == 3


async def test_failed_payment_racing_the_order_leaves_the_shelf_whole() -> None:
    store = InterleavingStore()
    assert await store.commit(Write(stock.level_key("A"), Level(5), 0))
    results = await asyncio.gather(
        stock.handle(order("o-1", ("A", 2)), store),
        stock.handle(declined("o-1"), store),
        return_exceptions=True,
    )
    # The failure read before the reservation existed: it is handed back...
    assert isinstance(results[1], Retry)
    assert await level(store, "A") == 3
    # ...and its retry releases the reservation.
    assert await stock.handle(declined("o-1"), store) == [StockReleased("o-1", [StockLine("A", 2)])]
    assert await level(store, "A") == 5
