"""The public contract: every event of the order flow, one ``msgspec.Struct`` each.

The subject an event travels on is its tag, so a stored event says what it is
(``{"type": "payments.succeeded", ...}``) and the table :data:`EVENT_TYPES` is
derived from the classes, never written twice. Publishers may leave ``type``
out (``nats pub orders.created '{...}'`` does): decoding goes by subject.

Validation happens here, at the boundary: bounds on quantities, prices, list
lengths and identifiers are part of the types, so a bad message fails to decode
with an error naming its path (``Expected `int` >= 1 - at `$.items[0].quantity```)
and never reaches a handler. Money is always integer cents.

Tolerant readers, strict writers: a field the contract does not know is
ignored on read (a storefront may add a coupon code to its orders; a newer
function may add a field to its event while older ones still run), and what a
function emits is encoded from these Structs, so it is exactly the contract.
Wrong types, missing required fields and bounds still fail, naming the path.

Each event class says its schema version (``schema_version``); an event
written with an older one is upgraded on read by the upcasters next to this
module (``functions/upcasters.py``), so handlers only ever see the current
version. docs/contract.md says when a version changes.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

# An order id is a token of every subject its events are stored on
# (orderflow/subjects.py), and of KV keys and message ids: it keeps to the
# characters all of them accept (no dots, which split tokens; no spaces or
# wildcards), and starts with a letter or digit (so `_` can stand for "none").
OrderId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Sku = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
CustomerId = Annotated[str, Meta(min_length=1, max_length=64)]
Quantity = Annotated[int, Meta(ge=1, le=1_000)]
Cents = Annotated[int, Meta(ge=0, le=100_000_000)]
Reason = Annotated[str, Meta(max_length=500)]


class Event(msgspec.Struct, frozen=True, tag_field="type"):
    """Base of every event: each one belongs to exactly one order.

    Unknown fields are ignored on read (no ``forbid_unknown_fields``, here or
    in the Structs events embed): see the module docstring.
    """

    #: The version of this kind's schema that this code writes (and reads; older
    #: ones are upgraded first). Raised only for a change old events need an
    #: upcaster for; an added optional field keeps it.
    schema_version: ClassVar[int] = 1

    order_id: OrderId


class AnyOrderId(msgspec.Struct):
    """Just the order id, read leniently from a message that failed to decode."""

    order_id: OrderId


class OrderItem(msgspec.Struct, frozen=True):
    sku: Sku
    quantity: Quantity
    unit_price_cents: Cents


class StockLine(msgspec.Struct, frozen=True):
    sku: Sku
    quantity: int


class Shortage(msgspec.Struct, frozen=True):
    sku: Sku
    requested: int
    available: int


# --- orders -----------------------------------------------------------------


class OrderCreated(Event, tag="orders.created", frozen=True):
    """Published by anyone; starts the flow."""

    customer_id: CustomerId
    items: Annotated[list[OrderItem], Meta(min_length=1, max_length=100)]
    payment_token: Annotated[str, Meta(min_length=1, max_length=64)]

    @property
    def total_cents(self) -> int:
        return sum(item.quantity * item.unit_price_cents for item in self.items)


class OrderCompleted(Event, tag="orders.completed", frozen=True):
    """Terminal: paid, reserved and scheduled for delivery."""

    tracking_id: str


class OrderCancelled(Event, tag="orders.cancelled", frozen=True):
    """Terminal: something failed, or a customer asked (``request_id``), and everything
    held for the order was given back."""

    reason: Reason
    #: The cancellation request that cancelled it, if one did (``CancelRequest``).
    request_id: str = ""
    requested_by: str = ""


class OrderRejected(Event, tag="orders.rejected", frozen=True):
    """An ``orders.created`` that could not be accepted (invalid), with the reason.

    Emitted whenever the order id can be read as a string, even one that is
    not a valid order id (that may be the reason): filed under the order when
    its id is subject-safe, under ``order._`` otherwise. The message itself
    goes to the dead letters, where it can be fixed and redriven.
    """

    order_id: Annotated[str, Meta(max_length=200)]  # as the publisher sent it
    reason: Reason


# --- payments ---------------------------------------------------------------


class PaymentSucceeded(Event, tag="payments.succeeded", frozen=True):
    amount_cents: Cents
    charge_id: str


class PaymentFailed(Event, tag="payments.failed", frozen=True):
    amount_cents: Cents
    reason: Reason


class PaymentRefunded(Event, tag="payments.refunded", frozen=True):
    """The charge of a succeeded payment went back to the customer."""

    amount_cents: Cents
    charge_id: str


# --- stock ------------------------------------------------------------------


class StockReserved(Event, tag="stock.reserved", frozen=True):
    items: list[StockLine]


class StockUnavailable(Event, tag="stock.unavailable", frozen=True):
    shortages: list[Shortage]


class StockReleased(Event, tag="stock.released", frozen=True):
    """A reservation went back on the shelf."""

    items: list[StockLine]


# --- delivery ---------------------------------------------------------------


class DeliveryScheduled(Event, tag="delivery.scheduled", frozen=True):
    """A delivery is booked: ``tracking_id`` is the ``carrier``'s.

    Version 2 added ``carrier``, required: a version 1 event is upgraded with the
    one carrier there was then (``functions/upcasters.py``).
    """

    schema_version = 2

    tracking_id: str
    carrier: Annotated[str, Meta(min_length=1, max_length=64)]


class DeliveryCancelled(Event, tag="delivery.cancelled", frozen=True):
    """The order will not be delivered: cancelled on request (``request_id``), or failed.

    With :class:`DeliveryScheduled` it is one of the two answers to "will this
    order be delivered?", and an order gets exactly one of them: the stream
    stores whichever comes first and refuses the other (:data:`DELIVERY_DECISIONS`).
    That is the one place where a cancellation and the order's own progress
    race, decided once by the order's history. A cancellation request stores it
    (``functions.cancel``); so does ``order`` before it ends a failed order, so
    that a request arriving at that moment is answered by what the order's
    history says, not by a guess.
    """

    reason: Reason
    request_id: str = ""  # empty: closed because the order failed, not on request
    requested_by: str = ""


# --- commands (orchestration mode) -------------------------------------------
#
# In orchestration mode the orchestrator tells each function what to do on a
# subject of its own (``saga.<function>.<verb>``); the functions answer with
# the events above, exactly as they do in choreography. A step the
# orchestrator sends again after a timeout carries the next ``attempt``, so it
# is a new message, not a duplicate the stream would drop.


class Command(Event, frozen=True):
    """A step the orchestrator asks of one function."""

    attempt: Annotated[int, Meta(ge=1)]


class ChargePayment(Command, tag="saga.payment.charge", frozen=True):
    """Charge the order's total (carries the order, as ``orders.created`` does)."""

    order: OrderCreated


class RefundPayment(Command, tag="saga.payment.refund", frozen=True):
    """Compensation: give back what was charged for the order, if anything was."""

    reason: Reason


class ReserveStock(Command, tag="saga.stock.reserve", frozen=True):
    order: OrderCreated


class ReleaseStock(Command, tag="saga.stock.release", frozen=True):
    """Compensation: put back what was reserved for the order, if anything was."""

    reason: Reason


class ScheduleDelivery(Command, tag="saga.delivery.schedule", frozen=True):
    """Both halves delivery waits for in choreography, handed over at once."""

    payment: PaymentSucceeded
    stock: StockReserved


class StepTimedOut(Event, tag="saga.timeout", frozen=True):
    """The orchestrator's alarm for one attempt of one step.

    The orchestrator emits it together with the command; the runner publishes
    it as a JetStream *scheduled* message on the order's alarm subject
    (``orderflow.subjects``), which the server publishes as ``saga.timeout``
    ``delay_ms`` later. If the step has answered by then, the alarm is stale
    and ignored. No clock is read in the handler.
    """

    step: str
    attempt: int
    delay_ms: Annotated[int, Meta(ge=0)]


class AlarmCleared(Event, tag="saga.alarms.cleared", frozen=True):
    """The saga is over: the runner withdraws its pending alarm, so none fires late."""


def _kinds(base: type[Event]) -> list[type[Event]]:
    """Every event class under ``base``, in the order they are defined above. A kind is
    a class with a subject as its tag; ``Command`` only groups the orchestrator's."""
    found: list[type[Event]] = []
    for cls in base.__subclasses__():
        if "." in str(cls.__struct_config__.tag):
            found.append(cls)
        found += _kinds(cls)
    return found


#: Every event class, found from the definitions above (none is listed twice).
EVENT_CLASSES: tuple[type[Event], ...] = tuple(_kinds(Event))


def subject_of(cls: type[Event]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str), cls
    return tag


#: subject -> event class; the only place subjects and types meet.
EVENT_TYPES: dict[str, type[Event]] = {subject_of(cls): cls for cls in EVENT_CLASSES}


def event_id(event: Event) -> str:
    """The event's unique, derived id, also its ``Nats-Msg-Id``.

    An order emits each kind of event at most once, so subject and order name
    it; a command or an alarm once per attempt of its step.
    """
    base = f"{subject_of(type(event))}:{event.order_id}"
    if isinstance(event, StepTimedOut):
        return f"{base}:{event.step}:{event.attempt}"
    if isinstance(event, Command):
        return f"{base}:{event.attempt}"
    return base


#: The kinds of which an order has at most one *between them*: stored with
#: ``Nats-Expected-Last-Subject-Sequence: 0`` checked against all of their subjects
#: (``orderflow.subjects.decision``), so the first stored decides and the stream
#: refuses the rest, however late.
DELIVERY_DECISIONS: tuple[type[Event], ...] = (DeliveryScheduled, DeliveryCancelled)


# --- requests ---------------------------------------------------------------
#
# Not events: what a client asks on a request subject and the answer it gets
# at once (NATS request/reply). What the answer changes is stored as events.


class CancelRequest(msgspec.Struct, frozen=True):
    """Cancel an order (``orders.cancel``), e.g. because the customer changed their mind.

    ``request_id`` names the request: asking again with the same id (an answer
    that got lost) gets the same answer. Left out, it is derived from the
    rest, so the same request sent twice is one request.
    """

    order_id: OrderId
    reason: Reason = ""
    requested_by: Annotated[str, Meta(max_length=64)] = ""
    request_id: Annotated[str, Meta(max_length=64)] = ""


class CancelAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    """``accepted``: the order will end cancelled, by this request or an earlier one.
    ``too late``: it will not (``rule`` says why); ``unknown``: no such order."""

    order_id: str
    answer: Literal["accepted", "too late", "unknown"]
    rule: str
    request_id: str = ""
    reason: str = ""


#: Where a cancellation is asked (``nats req orders.cancel '{"order_id": "o-1"}'``).
CANCEL_SUBJECT = "orders.cancel"

#: request subject -> what is asked on it (core NATS request/reply; nothing stores it).
REQUEST_TYPES: dict[str, type[CancelRequest]] = {CANCEL_SUBJECT: CancelRequest}


TERMINAL_SUBJECTS: frozenset[str] = frozenset({"orders.completed", "orders.cancelled"})
