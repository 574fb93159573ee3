"""order: follow each order and announce exactly one terminal event.

Reads the outcomes that can end an order (streams.yaml binds only those: a
payment or a reservation that succeeded decides nothing until delivery is
scheduled, though :func:`observe` accepts them) and keeps a summary per order
in the ``orders`` bucket (``order.<ID>`` -> :class:`OrderState`). The order is

* ``completed`` once delivery is scheduled;
* ``cancelled`` once a failure is *compensated*: the payment side holds no
  money (failed, or refunded) and the stock side holds no stock (unavailable,
  or released).

The terminal decision is recorded with compare-and-set before it is
announced, so it is taken once. The record also names the event that decided
it: a redelivery of *that* event (the process may have died between the
commit and the publish) announces it again, with the same message id, while
late news about a finished order announces nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from functions.events import (
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    StockReleased,
    StockReserved,
    StockUnavailable,
    subject_of,
)
from functions.state import Store, Write, optimistically

PaymentStatus = Literal["pending", "succeeded", "failed", "refunded"]
StockStatus = Literal["pending", "reserved", "unavailable", "released"]


class OrderState(msgspec.Struct, frozen=True):
    payment: PaymentStatus = "pending"
    stock: StockStatus = "pending"
    payment_problem: str = ""
    stock_problem: str = ""
    tracking_id: str = ""
    outcome: Literal["open", "completed", "cancelled"] = "open"
    decided_by: str = ""  # subject of the event that finished the order


def order_key(order_id: str) -> str:
    return f"order.{order_id}"


def observe(state: OrderState, event: Event) -> OrderState:
    """Pure: fold one event into the summary."""
    replace = msgspec.structs.replace
    match event:
        case PaymentSucceeded():
            # A refund may have been seen first; it stays the later fact.
            return state if state.payment == "refunded" else replace(state, payment="succeeded")
        case PaymentFailed(reason=reason):
            return replace(state, payment="failed", payment_problem=f"payment failed: {reason}")
        case PaymentRefunded():
            return replace(state, payment="refunded")
        case StockReserved():
            return state if state.stock == "released" else replace(state, stock="reserved")
        case StockUnavailable(shortages=shortages):
            short = ", ".join(
                f"{s.sku} (wanted {s.requested}, {s.available} left)" for s in shortages
            )
            return replace(state, stock="unavailable", stock_problem=f"out of stock: {short}")
        case StockReleased():
            return replace(state, stock="released")
        case DeliveryScheduled(tracking_id=tracking):
            return replace(state, tracking_id=tracking)
    raise TypeError(f"order does not handle {type(event).__name__}")


def decide(order_id: str, state: OrderState, trigger: str) -> tuple[OrderState, list[Event]]:
    """Pure: is the order finished after the event on subject ``trigger``, and how?"""
    if state.outcome != "open":
        return state, []
    replace = msgspec.structs.replace
    if state.tracking_id:
        state = replace(state, outcome="completed", decided_by=trigger)
    elif state.payment in ("failed", "refunded") and state.stock in ("unavailable", "released"):
        state = replace(state, outcome="cancelled", decided_by=trigger)
    return state, terminal_event(order_id, state)


def terminal_event(order_id: str, state: OrderState) -> list[Event]:
    """The terminal event of a finished order; none while it is open."""
    if state.outcome == "completed":
        return [OrderCompleted(order_id, tracking_id=state.tracking_id)]
    if state.outcome == "cancelled":
        reason = "; ".join(p for p in (state.payment_problem, state.stock_problem) if p)
        return [OrderCancelled(order_id, reason=reason)]
    return []


async def handle(event: Event, store: Store) -> Sequence[Event]:
    if isinstance(event, OrderCreated):
        return []  # nothing to follow until an outcome arrives (not bound in streams.yaml)
    trigger = subject_of(type(event))

    async def attempt() -> list[Event] | None:
        key = order_key(event.order_id)
        current = await store.get(key, OrderState)
        before = current.value if current else OrderState()
        if before.outcome != "open":
            # Say it again only to the event that decided it: the first answer
            # may have died with its process between commit and publish.
            return terminal_event(event.order_id, before) if before.decided_by == trigger else []
        state, events = decide(event.order_id, observe(before, event), trigger)
        if state == before:
            return []
        if not await store.commit(Write(key, state, current.revision if current else 0)):
            return None
        return events

    return await optimistically(attempt)
