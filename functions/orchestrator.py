"""orchestrator: drive each order as a saga: payment, then stock, then delivery.

The other style of the same flow (``--mode orchestration``). Instead of each
function reacting to the others' events, the orchestrator sends one command
at a time (``saga.<function>.<verb>``) and waits for the function's answer,
which is the very event the function publishes in choreography:

    payment ──succeeded──> stock ──reserved──> delivery ──scheduled──> completed
       │ failed              │ unavailable
       v                     v
    cancelled             refund ──refunded──> cancelled

A step with no answer within its deadline is sent again (a new attempt), at
most ``attempts`` times in all; a stock step that still has none then is
compensated in reverse: it is *released* (it may yet have reserved), then the
payment is *refunded*. Any other step then waits, sending nothing more: its
command stays with the function's consumer, which redelivers it until it is
answered or dead-lettered, and a late answer (a redriven dead letter) moves
the saga on. The payment step waits from its first deadline: a charge whose
outcome is unknown (the gateway does not answer) is parked in one dead letter,
and neither a second charge nor a refund can settle it before the gateway
answers (docs/effects-once.md, "A charge whose outcome is unknown").

State: the ``sagas`` bucket, ``saga.<ID>`` -> :class:`Saga`, written by
compare-and-set *before* the commands go out. ``last`` names the input that
produced the current state: its redelivery (the process died between commit
and publish) sends the same commands again, with the same message ids, which
the stream drops if they did get out. Any other late or repeated input finds
a state it does not apply to and sends nothing. So killing the orchestrator
anywhere loses no step and repeats none.

A cancellation request (``functions.cancel``) reaches the saga as the
``delivery.cancelled`` it stored: a step in flight is let answer, then what
is done is undone in reverse (a charge refunded, a reservation released); a
delivery step is undone at once, since the stream now refuses its
``delivery.scheduled``. A saga that fails on its own closes the order's
delivery decision the same way before it ends (step ``closing``: it sends
``delivery.cancelled`` and waits to read it back), so the terminal event
names whichever cancellation was stored first, as ``order`` does in
choreography.

Deadlines are :class:`StepTimedOut` alarms the orchestrator emits beside each
command; the runner has the server deliver them later. Nothing here reads a
clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from functions.events import (
    AlarmCleared,
    ChargePayment,
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleDelivery,
    StepTimedOut,
    StockReleased,
    StockReserved,
    StockUnavailable,
    subject_of,
)
from functions.order import cancelled
from functions.state import Store, Write, optimistically

Step = Literal["payment", "stock", "delivery", "release", "refund", "closing", "done"]
STEPS: tuple[Step, ...] = ("payment", "stock", "delivery", "release", "refund")


class StepPolicy(msgspec.Struct, frozen=True):
    """How long one step may stay silent, and what then."""

    timeout_ms: int
    #: ``retry``: send again every ``timeout_ms`` until ``attempts`` went
    #: unanswered, then wait. ``compensate``: the same, then undo what is
    #: done. ``wait``: send nothing again.
    on_timeout: Literal["retry", "compensate", "wait"] = "retry"
    attempts: int = 3


Policy = Mapping[Step, StepPolicy]


class Saga(msgspec.Struct, frozen=True):
    order: OrderCreated
    step: Step = "payment"
    attempt: int = 1
    charge: PaymentSucceeded | None = None
    reservation: StockReserved | None = None
    problem: str = ""
    outcome: Literal["open", "completed", "cancelled"] = "open"
    tracking_id: str = ""
    #: the order's delivery decision, once it is a cancellation (on request, or ours)
    cancel: DeliveryCancelled | None = None
    #: the input that produced this state (see the module docstring)
    last: str = ""


def saga_key(order_id: str) -> str:
    return f"saga.{order_id}"


def input_key(event: Event) -> str:
    """Which input an event is, for ``Saga.last``: its subject, or its alarm."""
    if isinstance(event, StepTimedOut):
        return f"{subject_of(StepTimedOut)}:{event.step}:{event.attempt}"
    return subject_of(type(event))


# --- pure decisions -----------------------------------------------------------


def commands(saga: Saga, policy: Policy) -> list[Event]:
    """What entering ``saga``'s current state sends: a command and its alarm, or the end."""
    order_id, attempt = saga.order.order_id, saga.attempt
    match saga.step:
        case "done":
            end: Event
            if saga.outcome == "completed":
                end = OrderCompleted(order_id, tracking_id=saga.tracking_id)
            elif saga.cancel is not None:
                end = cancelled(saga.cancel)
            else:
                # Ended before sagas closed their delivery decision (an older version's
                # saga, its last input redelivered): the end it announced then.
                end = OrderCancelled(order_id, reason=saga.problem)
            return [end, AlarmCleared(order_id)]
        case "closing":
            # No alarm: this is a write to the log, read back by our own consumer.
            return [DeliveryCancelled(order_id, reason=saga.problem or "cancelled")]
        case "payment":
            command: Event = ChargePayment(order_id, attempt, order=saga.order)
        case "stock":
            command = ReserveStock(order_id, attempt, order=saga.order)
        case "delivery":
            assert saga.charge is not None and saga.reservation is not None
            command = ScheduleDelivery(
                order_id, attempt, payment=saga.charge, stock=saga.reservation
            )
        case "release":
            command = ReleaseStock(order_id, attempt, reason=saga.problem)
        case "refund":
            command = RefundPayment(order_id, attempt, reason=saga.problem)
    alarm = StepTimedOut(order_id, saga.step, attempt, delay_ms=policy[saga.step].timeout_ms)
    return [command, alarm]


def _shortage(event: StockUnavailable) -> str:
    short = ", ".join(
        f"{s.sku} (wanted {s.requested}, {s.available} left)" for s in event.shortages
    )
    return f"out of stock: {short}"


def advance(saga: Saga, event: Event, policy: Policy) -> Saga:
    """Pure: the saga after ``event``; the same saga if the event does not apply now."""
    replace = msgspec.structs.replace

    def to(step: Step, **changes: object) -> Saga:
        return replace(saga, step=step, attempt=1, **changes)

    def ended(**changes: object) -> Saga:
        # Cancelled: at once if the delivery decision is a cancellation already,
        # else once ours is stored (or a request's, which got there first).
        if saga.cancel is not None:
            return to("done", outcome="cancelled", **changes)
        return to("closing", **changes)

    match saga.step, event:
        case "done", _:
            return saga
        case "closing", DeliveryCancelled():
            return to("done", outcome="cancelled", cancel=event)
        case _, DeliveryCancelled() if saga.cancel is None:
            if saga.step == "delivery":
                # Its delivery.scheduled will be refused: undo at once.
                return to("release", cancel=event, problem=event.reason)
            # A step in flight answers first; then what it did is undone.
            return replace(saga, cancel=event, problem=saga.problem or event.reason)
        case "payment", PaymentSucceeded() if saga.cancel is not None:
            return to("refund", charge=event)
        case "payment", PaymentSucceeded():
            return to("stock", charge=event)
        case "payment", PaymentFailed(reason=reason):
            return ended(problem=saga.problem or f"payment failed: {reason}")
        case "stock", StockReserved() if saga.cancel is not None:
            return to("release", reservation=event)
        case "stock", StockReserved():
            return to("delivery", reservation=event)
        case "stock", StockUnavailable():
            return to("refund", problem=saga.problem or _shortage(event))
        case "delivery", DeliveryScheduled(tracking_id=tracking):
            return to("done", outcome="completed", tracking_id=tracking)
        # Compensating: a late answer to the step that timed out tells us
        # whether there is anything to undo.
        case "release", StockReleased() | StockUnavailable():
            return to("refund")
        case "refund", PaymentRefunded() | PaymentFailed():
            return ended()
        case "refund", PaymentSucceeded():
            # The charge was decided after the refund was asked for (an
            # unknown outcome, redriven): now there is something to refund.
            return replace(saga, attempt=saga.attempt + 1)
        case step, StepTimedOut() if (
            step in STEPS and event.step == step and event.attempt == saga.attempt
        ):
            rule = policy[step]
            if rule.on_timeout != "wait" and saga.attempt < rule.attempts:
                return replace(saga, attempt=saga.attempt + 1)
            if rule.on_timeout != "compensate":
                # Overdue, and nothing more to send: the command is still with
                # its function's consumer, which redelivers it until it is
                # answered or dead-lettered (then `dlq redrive` resumes the
                # saga). Sending it again would only add a copy to dead-letter.
                return saga
            problem = f"{step} did not answer {saga.attempt} attempts of {rule.timeout_ms} ms"
            # Undo in reverse: stock may have reserved after all; payment may have charged.
            return to("release" if step == "stock" else "refund", problem=problem)
    return saga


def decide(saga: Saga | None, event: Event, policy: Policy) -> tuple[Saga | None, list[Event]]:
    """Pure: the new saga (``None``: nothing to record) and what to send."""
    key = input_key(event)
    if saga is None:
        if not isinstance(event, OrderCreated):
            # An answer with no saga: not an order we drive (or its saga was
            # lost, which compare-and-set prevents). Nothing to do.
            return None, []
        started = Saga(order=event, last=key)
        return started, commands(started, policy)
    after = advance(saga, event, policy)
    if after == saga:
        # Already applied: resend only if it was the last input (the sends
        # may have died with the process that committed it).
        return None, commands(saga, policy) if saga.last == key else []
    after = msgspec.structs.replace(after, last=key)
    if (after.step, after.attempt) == (saga.step, saga.attempt):
        return after, []  # only noted (a cancellation while a step is in flight)
    return after, commands(after, policy)


# --- the handler ------------------------------------------------------------


async def handle(event: Event, store: Store, policy: Policy) -> Sequence[Event]:
    key = saga_key(event.order_id)

    async def attempt() -> list[Event] | None:
        current = await store.get(key, Saga)
        saga, sends = decide(current.value if current else None, event, policy)
        if saga is None:
            return sends
        if not await store.commit(Write(key, saga, current.revision if current else 0)):
            return None
        return sends

    return await optimistically(attempt)
