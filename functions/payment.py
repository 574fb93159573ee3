"""payment: charge an order's total; refund it when stock cannot be reserved.

The charge itself happens at a payment gateway (:class:`Gateway`), an outside
system that may time out. Every call carries an idempotency key derived from
the order, so asking again after a crash or a timeout returns the first
answer instead of charging twice: the gateway's memory is the one record of
the charge, and this function keeps none of its own.

A refund is a join of two halves, read from the order's own history
(``functions.history``): the charge decided (``payments.succeeded``) and
stock short (``stock.unavailable``). The charge is *appended* before its
handler reads for the shortage, and the shortage is stored before its handler
reads for the charge, so whichever is stored later finds the other and
refunds (both may: the refund's key makes the second a no-op, and the log
takes ``payments.refunded`` once). A shortage that finds no charge waits for
nothing: it is not retried, because the charge's own handler will find it.

A cancellation (``delivery.cancelled`` stored on request, ``functions.cancel``)
is the refund's other trigger, joined the same way: the charge's handler reads
for it after appending, and its own handler reads for the charge. An order
cancelled before payment saw it is not charged at all: ``payments.failed``,
"not charged", which gives the stock back as a decline would. (Only a second
process charging the same order at the same moment, one stalled past its
``ack_wait``, could still charge it; it then finds the cancellation and
refunds.) In orchestration the orchestrator asks for refunds itself, so this
function is bound there without watching for cancellations
(``cancellable=False``).

So a charge whose outcome is unknown (the gateway does not answer) is parked
in exactly one dead letter, its ``orders.created``, and nothing else about the
order waits on a retry; redriving that one dead letter settles all of it. And
what payment emits for an order depends only on which events are stored,
never on the order they arrived in, which is what lets a recorded history
replay exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import msgspec

from functions.events import (
    DeliveryCancelled,
    Event,
    OrderCreated,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    StockUnavailable,
)
from functions.history import History

# --- the gateway interface --------------------------------------------------


class Charged(msgspec.Struct, frozen=True):
    charge_id: str


class Declined(msgspec.Struct, frozen=True):
    reason: str


class GatewayUnavailable(Exception):
    """A transient gateway fault (timeout, 5xx): the runner retries with backoff."""


class Gateway(Protocol):
    async def charge(
        self, *, idempotency_key: str, token: str, amount_cents: int
    ) -> Charged | Declined: ...

    async def refund(self, *, idempotency_key: str, charge_id: str, amount_cents: int) -> None: ...


def charge_key(order_id: str) -> str:
    return f"charge-{order_id}"


def refund_key(order_id: str) -> str:
    return f"refund-{order_id}"


# --- pure decisions -----------------------------------------------------------


def decided(order: OrderCreated, result: Charged | Declined) -> PaymentSucceeded | PaymentFailed:
    """The event the gateway's answer calls for; the same answer, the same event."""
    if isinstance(result, Charged):
        return PaymentSucceeded(order.order_id, order.total_cents, charge_id=result.charge_id)
    return PaymentFailed(order.order_id, order.total_cents, reason=result.reason)


def refunded(charge: PaymentSucceeded) -> PaymentRefunded:
    return PaymentRefunded(charge.order_id, charge.amount_cents, charge_id=charge.charge_id)


def not_charged(order: OrderCreated, cancellation: DeliveryCancelled) -> PaymentFailed:
    return PaymentFailed(
        order.order_id,
        order.total_cents,
        reason=f"not charged: cancelled on request {cancellation.request_id}",
    )


# --- the handler ------------------------------------------------------------


async def handle(
    event: Event, history: History, gateway: Gateway, *, cancellable: bool = True
) -> Sequence[Event]:
    if isinstance(event, OrderCreated):
        return await _charge(event, history, gateway, cancellable)
    if isinstance(event, StockUnavailable):
        return await _refund_if_charged(event.order_id, history, gateway)
    if isinstance(event, DeliveryCancelled) and cancellable:
        if not event.request_id:
            return []  # closed by ``order`` once the failed order had given everything back
        return await _refund_if_charged(event.order_id, history, gateway)
    raise TypeError(f"payment does not handle {type(event).__name__}")


async def _refund_if_charged(order_id: str, history: History, gateway: Gateway) -> list[Event]:
    charge = await history.last(order_id, PaymentSucceeded)
    if charge is None:
        return []  # declined, or not decided yet: its handler finds what asks for a refund
    return [await _give_back(charge, gateway)]


async def _charge(
    order: OrderCreated, history: History, gateway: Gateway, cancellable: bool
) -> list[Event]:
    if cancellable:
        charge, cancellation = await asyncio.gather(
            history.last(order.order_id, PaymentSucceeded),
            history.last(order.order_id, DeliveryCancelled),
        )
        if cancellation is not None and charge is None:
            return [not_charged(order, cancellation)]
    result = await gateway.charge(
        idempotency_key=charge_key(order.order_id),
        token=order.payment_token,
        amount_cents=order.total_cents,
    )
    decision = decided(order, result)
    if isinstance(decision, PaymentFailed):
        return [decision]  # no money taken: nothing to give back, whatever stock says
    # Stored before reading for the other half of the refund's join.
    await history.append(decision)
    wanted: list[type[Event]] = [StockUnavailable]
    if cancellable:
        wanted.append(DeliveryCancelled)
    found = await asyncio.gather(*(history.last(order.order_id, kind) for kind in wanted))
    if all(event is None for event in found):
        return [decision]
    return [decision, await _give_back(decision, gateway)]


async def _give_back(charge: PaymentSucceeded, gateway: Gateway) -> PaymentRefunded:
    """Refund a decided charge at the gateway (idempotent by its key)."""
    await gateway.refund(
        idempotency_key=refund_key(charge.order_id),
        charge_id=charge.charge_id,
        amount_cents=charge.amount_cents,
    )
    return refunded(charge)
