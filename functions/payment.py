"""payment: charge an order's total; refund it when stock cannot be reserved.

The charge itself happens at a payment gateway (:class:`Gateway`), an outside
system that may time out. Every call carries an idempotency key derived from
the order, so asking again after a crash or a timeout returns the first
answer instead of charging twice.

State (the ``payments`` bucket, ``payment.<ID>`` -> :class:`PaymentRecord`)
says where the order stands. The record is *claimed* (``charging``) before
the gateway is called, so a charge is never made twice.

A refund needs a charge to refund: ``stock.unavailable`` that arrives before
this function has decided the charge (no record yet, or one still
``charging``) is retried later rather than guessed at. So what payment emits
for an order depends only on which events it has seen, never on the order it
saw them in, which is what lets a recorded history replay exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

from functions.errors import Retry
from functions.events import (
    Event,
    OrderCreated,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    StockUnavailable,
)
from functions.state import Store, Versioned, Write, optimistically

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


# --- state ------------------------------------------------------------------


class PaymentRecord(msgspec.Struct, frozen=True):
    status: Literal["charging", "charged", "declined", "refunded"]
    amount_cents: int = 0
    charge_id: str | None = None
    reason: str = ""


def payment_key(order_id: str) -> str:
    return f"payment.{order_id}"


def charge_key(order_id: str) -> str:
    return f"charge-{order_id}"


def refund_key(order_id: str) -> str:
    return f"refund-{order_id}"


# --- pure decisions -----------------------------------------------------------


def after_charge(amount_cents: int, result: Charged | Declined) -> PaymentRecord:
    if isinstance(result, Charged):
        return PaymentRecord("charged", amount_cents, charge_id=result.charge_id)
    return PaymentRecord("declined", amount_cents, reason=result.reason)


def events_for(order_id: str, record: PaymentRecord, trigger: type[Event]) -> list[Event]:
    """What the record says was emitted in answer to ``trigger``; the same on every redelivery."""
    if trigger is OrderCreated:
        if record.status in ("charged", "refunded") and record.charge_id:
            return [PaymentSucceeded(order_id, record.amount_cents, charge_id=record.charge_id)]
        if record.status == "declined":
            return [PaymentFailed(order_id, record.amount_cents, reason=record.reason)]
        return []  # still charging: nothing decided yet
    if record.status == "refunded" and record.charge_id:
        return [PaymentRefunded(order_id, record.amount_cents, charge_id=record.charge_id)]
    return []  # declined: no money was taken, nothing to give back


# --- the handler ------------------------------------------------------------


async def handle(event: Event, store: Store, gateway: Gateway) -> Sequence[Event]:
    if isinstance(event, OrderCreated):
        return await optimistically(lambda: _charge(event, store, gateway))
    if isinstance(event, StockUnavailable):
        return await optimistically(lambda: _refund(event, store, gateway))
    raise TypeError(f"payment does not handle {type(event).__name__}")


async def _charge(order: OrderCreated, store: Store, gateway: Gateway) -> list[Event] | None:
    key = payment_key(order.order_id)
    # Claim the order before touching the gateway (see the module docstring).
    # Claim first and read only when the claim is there already (a redelivery):
    # one request instead of two for a new order.
    claim = PaymentRecord("charging", order.total_cents)
    revision = await store.commit(Write(key, claim, 0))
    current = Versioned(claim, revision) if revision else await store.get(key, PaymentRecord)
    if current is None:
        return None  # (records are never deleted: cannot happen) read again
    if current.value.status != "charging":
        return events_for(order.order_id, current.value, OrderCreated)
    result = await gateway.charge(
        idempotency_key=charge_key(order.order_id),
        token=order.payment_token,
        amount_cents=current.value.amount_cents,
    )
    record = after_charge(current.value.amount_cents, result)
    if not await store.commit(Write(key, record, current.revision)):
        return None
    return events_for(order.order_id, record, OrderCreated)


async def _refund(
    unavailable: StockUnavailable, store: Store, gateway: Gateway
) -> list[Event] | None:
    key = payment_key(unavailable.order_id)
    current = await store.get(key, PaymentRecord)
    if current is None or current.value.status == "charging":
        # Ours to settle once the charge is decided (orders.created is ahead
        # of this message in our own consumer, so it is on its way).
        raise Retry("the charge for this order is not decided yet")
    if current.value.status != "charged":
        return events_for(unavailable.order_id, current.value, StockUnavailable)
    charge_id = current.value.charge_id
    assert charge_id is not None
    await gateway.refund(
        idempotency_key=refund_key(unavailable.order_id),
        charge_id=charge_id,
        amount_cents=current.value.amount_cents,
    )
    record = msgspec.structs.replace(current.value, status="refunded")
    if not await store.commit(Write(key, record, current.revision)):
        return None
    return events_for(unavailable.order_id, record, StockUnavailable)
