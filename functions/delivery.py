"""delivery: schedule a delivery once an order is both paid and reserved.

The two halves arrive in any order, on any replica, possibly more than once.
The join is read from the order's own history: each half, once stored, asks
for the other (``functions.history``), so the handler of the later-stored
half always finds the earlier one and schedules. If both find each other,
both answer the same ``delivery.scheduled`` (same tracking id), which the log
takes once; a redelivery of either half does the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from functions.events import DeliveryScheduled, Event, PaymentSucceeded, StockReserved
from functions.history import History

#: The carrier deliveries are booked with: the built-in, simulated one.
CARRIER = "orderflow-post"


def tracking_id(order_id: str) -> str:
    # Derived, not drawn: a replay or a redelivery must produce the same id.
    return "TRK-" + hashlib.sha256(order_id.encode()).hexdigest()[:12].upper()


def other_half(event: Event) -> type[PaymentSucceeded] | type[StockReserved]:
    if isinstance(event, PaymentSucceeded):
        return StockReserved
    if isinstance(event, StockReserved):
        return PaymentSucceeded
    raise TypeError(f"delivery does not handle {type(event).__name__}")


def decide(order_id: str, other: Event | None) -> list[Event]:
    """Pure: what one half emits, given whether the other half is stored."""
    if other is None:
        return []  # the other half's handler will find this one
    return [DeliveryScheduled(order_id, tracking_id=tracking_id(order_id), carrier=CARRIER)]


async def handle(event: Event, history: History) -> Sequence[Event]:
    other = await history.last(event.order_id, other_half(event))
    return decide(event.order_id, other)
