"""payment: charge an order's total; refund it when stock cannot be reserved.

The charge itself happens at a payment gateway (:class:`Gateway`), an outside
system that may time out. Every call carries an idempotency key derived from
the order, so asking again after a crash or a timeout returns the first
answer instead of charging twice.

State (the ``payments`` bucket, ``payment.<ID>`` -> :class:`PaymentRecord`)
says where the order stands. The record is *claimed* (``charging``) before
the gateway is called, so a charge is never made twice.

A refund needs a charge to refund. ``stock.unavailable`` that arrives before
this function has decided the charge (no record yet, or one still
``charging``) is *recorded* (``refund_due``) rather than guessed at or retried:
whoever decides the charge then refunds it at once and answers both
(``payments.succeeded`` and ``payments.refunded``). A charge whose outcome is
unknown (the gateway does not answer) is thus parked in exactly one dead
letter, its ``orders.created``; nothing else about the order waits on a retry,
and redriving that one dead letter settles all of it. So what payment emits
for an order depends only on which events it has seen, never on the order it
saw them in, which is what lets a recorded history replay exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

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
    #: stock.unavailable came while the charge was undecided: refund on deciding it.
    refund_due: bool = False


def payment_key(order_id: str) -> str:
    return f"payment.{order_id}"


def charge_key(order_id: str) -> str:
    return f"charge-{order_id}"


def refund_key(order_id: str) -> str:
    return f"refund-{order_id}"


# --- pure decisions -----------------------------------------------------------


def after_charge(
    amount_cents: int, result: Charged | Declined, refund_due: bool = False
) -> PaymentRecord:
    if isinstance(result, Charged):
        return PaymentRecord(
            "charged", amount_cents, charge_id=result.charge_id, refund_due=refund_due
        )
    return PaymentRecord("declined", amount_cents, reason=result.reason, refund_due=refund_due)


def events_for(order_id: str, record: PaymentRecord, trigger: type[Event]) -> list[Event]:
    """What the record says was emitted in answer to ``trigger``; the same on every redelivery."""
    if trigger is OrderCreated:
        if record.status in ("charged", "refunded") and record.charge_id:
            succeeded = PaymentSucceeded(order_id, record.amount_cents, charge_id=record.charge_id)
            if record.status == "refunded" and record.refund_due:
                # The refund was owed when the charge was decided: it answers both.
                refunded = PaymentRefunded(order_id, record.amount_cents, record.charge_id)
                return [succeeded, refunded]
            return [succeeded]
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
    # Claim first and read only when the claim is there already (a redelivery,
    # or a refund that came first): one request instead of two for a new order.
    amount = order.total_cents
    claim = PaymentRecord("charging", amount)
    revision = await store.commit(Write(key, claim, 0))
    current = Versioned(claim, revision) if revision else await store.get(key, PaymentRecord)
    if current is None:
        return None  # (records are never deleted: cannot happen) read again
    if current.value.status != "charging":
        return events_for(order.order_id, current.value, OrderCreated)
    result = await gateway.charge(
        idempotency_key=charge_key(order.order_id), token=order.payment_token, amount_cents=amount
    )
    record = after_charge(amount, result, current.value.refund_due)
    if record.status == "charged" and record.refund_due:
        record = await _give_back(order.order_id, record, gateway)
    if not await store.commit(Write(key, record, current.revision)):
        return None
    return events_for(order.order_id, record, OrderCreated)


async def _refund(
    unavailable: StockUnavailable, store: Store, gateway: Gateway
) -> list[Event] | None:
    key = payment_key(unavailable.order_id)
    current = await store.get(key, PaymentRecord)
    if current is None or current.value.status == "charging":
        if current is not None and current.value.refund_due:
            return []  # recorded already
        # Undecided: whoever decides the charge refunds it (module docstring).
        # No record yet: orders.created is on its way; its claim adopts this one.
        due = PaymentRecord("charging", refund_due=True)
        if current is not None:
            due = msgspec.structs.replace(current.value, refund_due=True)
        if not await store.commit(Write(key, due, current.revision if current else 0)):
            return None
        return []
    if current.value.status != "charged":
        return events_for(unavailable.order_id, current.value, StockUnavailable)
    record = await _give_back(unavailable.order_id, current.value, gateway)
    if not await store.commit(Write(key, record, current.revision)):
        return None
    return events_for(unavailable.order_id, record, StockUnavailable)


async def _give_back(order_id: str, charged: PaymentRecord, gateway: Gateway) -> PaymentRecord:
    """Refund a decided charge at the gateway (idempotent by key): the record after."""
    assert charged.charge_id is not None
    await gateway.refund(
        idempotency_key=refund_key(order_id),
        charge_id=charged.charge_id,
        amount_cents=charged.amount_cents,
    )
    return msgspec.structs.replace(charged, status="refunded")
