"""order: announce exactly one terminal event per order.

Reads the outcomes that can end an order (streams.yaml binds only those) and
decides from the order's own history, not from a copy of it:

* ``completed`` once delivery is scheduled;
* ``cancelled`` once a failure is *compensated*: the payment side holds no
  money (failed, or refunded) and the stock side holds no stock (unavailable,
  or released).

A cancellation is a join like delivery's: each outcome, once stored, reads
the ones that settle the other side (``functions.history``), so the handler
of the later-stored one always sees both sides settled. Whoever decides
announces; the log takes the terminal event once, and the flow never settles
both ways (completion needs a charge and a reservation that stood, a
cancellation that one of them failed or was given back). A redelivery, or
late news about a finished order, announces the same event again, which the
log refuses as already stored.

Before announcing a cancellation it closes the order's delivery decision:
it appends ``delivery.cancelled`` (the failure as its reason), which the
stream takes unless a cancellation request got there first
(``functions.cancel``), then reads back which one stands. So a request that
arrives while a failed order is ending is answered by the same fact the
terminal event names: the request's, or the failure's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from functions.errors import Permanent
from functions.events import (
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    PaymentFailed,
    PaymentRefunded,
    StockReleased,
    StockUnavailable,
)
from functions.history import History

#: The outcomes that settle each side of a cancelled order.
SETTLES_PAYMENT: tuple[type[Event], ...] = (PaymentFailed, PaymentRefunded)
SETTLES_STOCK: tuple[type[Event], ...] = (StockUnavailable, StockReleased)


def reason(outcomes: Sequence[Event]) -> str:
    """Why the order was cancelled: the failures among its outcomes, payment first."""
    problems: list[str] = []
    for event in outcomes:
        if isinstance(event, PaymentFailed):
            problems.insert(0, f"payment failed: {event.reason}")
        elif isinstance(event, StockUnavailable):
            short = ", ".join(
                f"{s.sku} (wanted {s.requested}, {s.available} left)" for s in event.shortages
            )
            problems.append(f"out of stock: {short}")
    return "; ".join(problems)


def decide(order_id: str, outcomes: Sequence[Event]) -> list[Event]:
    """Pure: what the order's settled outcomes call for: its completion, or the close of
    its delivery decision a cancellation starts with (:func:`cancelled`)."""
    for event in outcomes:
        if isinstance(event, DeliveryScheduled):
            return [OrderCompleted(order_id, tracking_id=event.tracking_id)]
    paid_back = any(isinstance(e, SETTLES_PAYMENT) for e in outcomes)
    put_back = any(isinstance(e, SETTLES_STOCK) for e in outcomes)
    if paid_back and put_back:
        return [DeliveryCancelled(order_id, reason=reason(outcomes) or "cancelled")]
    return []


def cancelled(closed: DeliveryCancelled) -> OrderCancelled:
    """Pure: the terminal event of an order whose delivery decision is ``closed``."""
    if not closed.request_id:
        return OrderCancelled(closed.order_id, reason=closed.reason)
    by = f" by {closed.requested_by}" if closed.requested_by else ""
    return OrderCancelled(
        closed.order_id,
        reason=f"cancelled on request {closed.request_id}{by}: {closed.reason}"[:500],
        request_id=closed.request_id,
        requested_by=closed.requested_by,
    )


async def handle(event: Event, history: History) -> Sequence[Event]:
    if isinstance(event, DeliveryScheduled):
        return decide(event.order_id, [event])  # nothing to read: it decides alone
    if not isinstance(event, SETTLES_PAYMENT + SETTLES_STOCK):
        raise TypeError(f"order does not handle {type(event).__name__}")
    others = [kind for kind in SETTLES_PAYMENT + SETTLES_STOCK if not isinstance(event, kind)]
    found = await asyncio.gather(*(history.last(event.order_id, kind) for kind in others))
    decided = decide(event.order_id, [event, *(e for e in found if e is not None)])
    if not decided:
        return []
    # Closed before announcing: refused if a request closed it first.
    await history.append(decided[0])
    closed = await history.last(event.order_id, DeliveryCancelled)
    if closed is None:
        # Delivery was scheduled, yet both sides are given back: a bug upstream.
        raise Permanent(f"order {event.order_id} settled both ways: cancelled after delivery")
    return [cancelled(closed)]
