"""cancel: answer a request to cancel an order, at once: ``accepted`` or ``too late``.

The rule: an order can be cancelled until its delivery is scheduled. That is
the point of no return: the parcel is handed to the carrier, so what the
customer asks for after it is a return, not a cancellation. Before it,
everything the order holds can still be given back (the charge refunded,
the reservation released), and nothing has left the warehouse.

The request and the order's own progress race at exactly one point, and the
order's history decides it: accepting stores ``delivery.cancelled``, which the
stream takes only if the order has no delivery decision yet
(``functions.events.DELIVERY_DECISIONS``). So the request is accepted if its
``delivery.cancelled`` is stored first; if ``delivery.scheduled`` was, it is
too late; and if the order failed first, ``order`` stored a
``delivery.cancelled`` of its own before ending it, and the answer says so.
After storing, the answer is read back from the history, never assumed: the
same request asked again (its answer lost, or the process killed right after
it decided) finds its own decision and gets the same answer.

What an accepted cancellation sets off is the flow's own: payment refunds or
never charges, stock gives back, and ``order`` ends the order with one
``orders.cancelled`` naming the request (in orchestration, the orchestrator
does all three). This function does nothing else, and keeps nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Literal

import msgspec

from functions.events import (
    CancelAnswer,
    CancelRequest,
    ChargePayment,
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCompleted,
    OrderCreated,
    OrderRejected,
    PaymentFailed,
    PaymentSucceeded,
    StockReserved,
    StockUnavailable,
)
from functions.history import History

#: Any of these stored means the order exists (a payload-only ``orders.created``
#: is stored off the order's subjects, so its first reactions are the evidence).
EVIDENCE: tuple[type[Event], ...] = (
    OrderCreated,
    ChargePayment,
    PaymentSucceeded,
    PaymentFailed,
    StockReserved,
    StockUnavailable,
)


Verdict = Literal["accepted", "too late", "unknown"]


class Facts(msgspec.Struct, frozen=True):
    """What the answer depends on, as read from the order's history."""

    exists: bool
    decision: DeliveryScheduled | DeliveryCancelled | None = None
    completed: bool = False
    rejected: OrderRejected | None = None


def identified(request: CancelRequest) -> CancelRequest:
    """The request with its id: the one it gave, or one derived from what it asks."""
    if request.request_id:
        return request
    asked = f"{request.order_id}\n{request.requested_by}\n{request.reason}"
    return msgspec.structs.replace(
        request, request_id="cancel-" + hashlib.sha256(asked.encode()).hexdigest()[:16]
    )


def answer(request: CancelRequest, facts: Facts) -> CancelAnswer | None:
    """Pure: the answer the history gives, or ``None`` when the request may decide it."""

    def said(verdict: Verdict, rule: str) -> CancelAnswer:
        return CancelAnswer(request.order_id, verdict, rule, request.request_id, request.reason)

    decision = facts.decision
    if isinstance(decision, DeliveryScheduled):
        if facts.completed:
            return said("too late", "the order is already completed")
        return said(
            "too late",
            "delivery is already scheduled (the point of no return: what is handed to "
            "the carrier is returned, not cancelled)",
        )
    if isinstance(decision, DeliveryCancelled):
        if decision.request_id == request.request_id:
            return said("accepted", "cancelled on this request")
        if decision.request_id:
            return said(
                "accepted",
                f"already cancelled on request {decision.request_id}"
                + (f" by {decision.requested_by}" if decision.requested_by else ""),
            )
        return said("too late", f"the order is already cancelled: {decision.reason}")
    if facts.rejected is not None:
        return said("too late", f"the order was rejected: {facts.rejected.reason}")
    if not facts.exists:
        return said(
            "unknown",
            "nothing is stored for this order (not created, expired, or not seen by any "
            "function yet)",
        )
    return None


def accepting(request: CancelRequest) -> DeliveryCancelled:
    reason = request.reason or "cancelled on request"
    return DeliveryCancelled(
        request.order_id,
        reason=reason,
        request_id=request.request_id,
        requested_by=request.requested_by,
    )


async def facts(order_id: str, history: History) -> Facts:
    kinds: tuple[type[Event], ...] = (
        DeliveryScheduled,
        DeliveryCancelled,
        OrderCompleted,
        OrderRejected,
        *EVIDENCE,
    )
    found = await asyncio.gather(*(history.last(order_id, kind) for kind in kinds))
    scheduled, cancelled, completed, rejected, *evidence = found
    assert rejected is None or isinstance(rejected, OrderRejected)
    decision = scheduled or cancelled
    assert decision is None or isinstance(decision, DeliveryScheduled | DeliveryCancelled)
    return Facts(
        exists=any(e is not None for e in evidence) or decision is not None,
        decision=decision,
        completed=completed is not None,
        rejected=rejected,
    )


async def handle(request: CancelRequest, history: History) -> CancelAnswer:
    request = identified(request)
    said = answer(request, await facts(request.order_id, history))
    if said is not None:
        return said
    # The stream takes this only if the order has no delivery decision yet;
    # whatever it holds now is the answer.
    await history.append(accepting(request))
    said = answer(request, await facts(request.order_id, history))
    assert said is not None, "a delivery decision is stored: ours, or the one before it"
    return said
