"""delivery: schedule a delivery once an order is both paid and reserved.

The two halves arrive in any order, on any replica, possibly more than once.
The join lives in the ``deliveries`` bucket (``join.<ID>`` -> :class:`Join`) and
is updated by compare-and-set, so exactly one handler sees the second half
arrive and schedules; a redelivery of either half finds the join complete and
repeats the same ``delivery.scheduled`` (same tracking id, same message id),
which the stream's duplicate window drops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from functions.events import DeliveryScheduled, Event, PaymentSucceeded, StockReserved
from functions.state import Store, Write, optimistically


class Join(msgspec.Struct, frozen=True):
    paid: bool = False
    reserved: bool = False


def join_key(order_id: str) -> str:
    return f"join.{order_id}"


def tracking_id(order_id: str) -> str:
    # Derived, not drawn: a replay or a redelivery must produce the same id.
    return "TRK-" + hashlib.sha256(order_id.encode()).hexdigest()[:12].upper()


def decide(event: Event, join: Join) -> tuple[Join, list[Event]]:
    """Pure: the join after ``event`` and what to emit."""
    if isinstance(event, PaymentSucceeded):
        join = msgspec.structs.replace(join, paid=True)
    elif isinstance(event, StockReserved):
        join = msgspec.structs.replace(join, reserved=True)
    else:
        raise TypeError(f"delivery does not handle {type(event).__name__}")
    if join.paid and join.reserved:
        return join, [DeliveryScheduled(event.order_id, tracking_id=tracking_id(event.order_id))]
    return join, []


async def handle(event: Event, store: Store) -> Sequence[Event]:
    async def attempt() -> list[Event] | None:
        key = join_key(event.order_id)
        current = await store.get(key, Join)
        join, events = decide(event, current.value if current else Join())
        if current is not None and join == current.value:
            return events  # a redelivery: nothing new to remember
        if not await store.commit(Write(key, join, current.revision if current else 0)):
            return None
        return events

    return await optimistically(attempt)
