"""stock: reserve every item of an order or none; give it back when payment fails.

State (the ``stock`` bucket):

* ``level.<SKU>``  -> :class:`Level`, units on the shelf;
* ``order.<ID>``   -> :class:`Reservation`, what this function decided for the order.

A reservation decrements every SKU's level *and* creates the order's record in
one atomic commit, so a redelivered ``orders.created`` finds the record and
repeats the recorded outcome instead of reserving twice, and two replicas
racing on the same SKU cannot both take the last unit.

A release needs a reservation decision: ``payments.failed`` that arrives
before this function has handled the order is retried later rather than
guessed at, so what stock emits for an order depends only on which events it
has seen, never on their order (what lets a recorded history replay exactly).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from functions.errors import Retry
from functions.events import (
    Event,
    OrderCreated,
    PaymentFailed,
    Shortage,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
)
from functions.state import Store, Versioned, Write, optimistically


class Level(msgspec.Struct, frozen=True):
    available: int


class Reservation(msgspec.Struct, frozen=True):
    # reserved -> released; unavailable is final.
    status: Literal["reserved", "unavailable", "released"]
    items: list[StockLine] = []
    shortages: list[Shortage] = []


def level_key(sku: str) -> str:
    return f"level.{sku}"


def order_key(order_id: str) -> str:
    return f"order.{order_id}"


# --- pure decisions -----------------------------------------------------------


def wanted(order: OrderCreated) -> list[StockLine]:
    """Quantities per SKU, a SKU listed twice counted once, in first-seen order."""
    totals: dict[str, int] = {}
    for item in order.items:
        totals[item.sku] = totals.get(item.sku, 0) + item.quantity
    return [StockLine(sku, quantity) for sku, quantity in totals.items()]


def decide_reservation(
    order: OrderCreated, available: Mapping[str, int]
) -> tuple[Reservation, dict[str, int]]:
    """All or nothing: the order's record and the new level of every SKU it touches."""
    lines = wanted(order)
    shortages = [
        Shortage(line.sku, line.quantity, available.get(line.sku, 0))
        for line in lines
        if available.get(line.sku, 0) < line.quantity
    ]
    if shortages:
        return Reservation("unavailable", shortages=shortages), {}
    levels = {line.sku: available[line.sku] - line.quantity for line in lines}
    return Reservation("reserved", items=lines), levels


def decide_release(
    reservation: Reservation, available: Mapping[str, int]
) -> tuple[Reservation | None, dict[str, int]]:
    """After a failed payment: the order's new record and levels (``None``: nothing to change)."""
    if reservation.status == "reserved":
        levels = {line.sku: available[line.sku] + line.quantity for line in reservation.items}
        return Reservation("released", items=reservation.items), levels
    return None, {}


def events_for(order_id: str, reservation: Reservation, trigger: type[Event]) -> list[Event]:
    """What the record says was emitted in answer to ``trigger``; the same on every redelivery."""
    if trigger is OrderCreated:
        if reservation.status in ("reserved", "released"):
            return [StockReserved(order_id, items=reservation.items)]
        return [StockUnavailable(order_id, shortages=reservation.shortages)]
    if reservation.status == "released":
        return [StockReleased(order_id, items=reservation.items)]
    return []  # unavailable: nothing is held, nothing to give back


# --- the handler ------------------------------------------------------------


async def handle(event: Event, store: Store) -> Sequence[Event]:
    if isinstance(event, OrderCreated):
        return await optimistically(lambda: _reserve(event, store))
    if isinstance(event, PaymentFailed):
        return await optimistically(lambda: _release(event, store))
    raise TypeError(f"stock does not handle {type(event).__name__}")


async def _levels(store: Store, skus: Sequence[str]) -> dict[str, Versioned[Level] | None]:
    entries = await asyncio.gather(*(store.get(level_key(sku), Level) for sku in skus))
    return dict(zip(skus, entries, strict=True))


def _level_writes(
    new_levels: Mapping[str, int], current: Mapping[str, Versioned[Level] | None]
) -> list[Write]:
    writes = []
    for sku, available in new_levels.items():
        entry = current[sku]
        writes.append(Write(level_key(sku), Level(available), entry.revision if entry else 0))
    return writes


async def _reserve(order: OrderCreated, store: Store) -> list[Event] | None:
    existing = await store.get(order_key(order.order_id), Reservation)
    if existing is not None:
        return events_for(order.order_id, existing.value, OrderCreated)
    current = await _levels(store, [line.sku for line in wanted(order)])
    available = {sku: entry.value.available if entry else 0 for sku, entry in current.items()}
    reservation, new_levels = decide_reservation(order, available)
    writes = [*_level_writes(new_levels, current), Write(order_key(order.order_id), reservation, 0)]
    if not await store.commit(*writes):
        return None
    return events_for(order.order_id, reservation, OrderCreated)


async def _release(failed: PaymentFailed, store: Store) -> list[Event] | None:
    existing = await store.get(order_key(failed.order_id), Reservation)
    if existing is None:
        # Ours to settle once we have decided the reservation (orders.created
        # is ahead of this message in our own consumer, so it is on its way).
        raise Retry("no reservation decided for this order yet")
    reservation = existing.value
    held = reservation.items if reservation.status == "reserved" else []
    current = await _levels(store, [line.sku for line in held])
    available = {sku: entry.value.available if entry else 0 for sku, entry in current.items()}
    new_reservation, new_levels = decide_release(reservation, available)
    if new_reservation is None:
        return events_for(failed.order_id, reservation, PaymentFailed)
    writes = [
        *_level_writes(new_levels, current),
        Write(order_key(failed.order_id), new_reservation, existing.revision),
    ]
    if not await store.commit(*writes):
        return None
    return events_for(failed.order_id, new_reservation, PaymentFailed)
