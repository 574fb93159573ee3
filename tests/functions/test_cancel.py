"""cancel: the answer at every point of the flow, and the one race it has, decided by the log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from functions import cancel, order
from functions.events import (
    CancelRequest,
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    OrderRejected,
    PaymentFailed,
    PaymentSucceeded,
    Shortage,
    StockLine,
    StockReserved,
    StockUnavailable,
)
from functions.history import E, History, MemoryHistory
from tests.flowkit import order as placed

REQUEST = CancelRequest("o-1", reason="changed my mind", requested_by="ann", request_id="r-1")
CREATED = placed("o-1", BOOK_42=2)
CHARGED = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", [StockLine("BOOK-42", 2)])
SCHEDULED = DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post")
FAILED = PaymentFailed("o-1", 3000, reason="card_declined")
UNAVAILABLE = StockUnavailable("o-1", [Shortage("BOOK-42", 2, 1)])


def log_of(*events: Event) -> MemoryHistory:
    history = MemoryHistory()
    for event in events:
        assert history.record(event)
    return history


# Per point of the flow: what is stored, the answer, and whether it stores the cancellation.
POINTS: dict[str, tuple[tuple[Event, ...], str, bool]] = {
    "before-payment": ((CREATED,), "accepted", True),
    "after-charge": ((CREATED, CHARGED), "accepted", True),
    "after-reservation": ((CREATED, CHARGED, RESERVED), "accepted", True),
    "failing-not-ended": ((CREATED, FAILED, UNAVAILABLE), "accepted", True),
    "after-delivery-scheduled": ((CREATED, CHARGED, RESERVED, SCHEDULED), "too late", False),
    "after-completion": (
        (CREATED, CHARGED, RESERVED, SCHEDULED, OrderCompleted("o-1", tracking_id="TRK-1")),
        "too late",
        False,
    ),
    "after-failure-ended": (
        (CREATED, FAILED, UNAVAILABLE, DeliveryCancelled("o-1", reason="payment failed")),
        "too late",
        False,
    ),
    "payload-only-ingress-seen-by-stock": ((RESERVED,), "accepted", True),
    "unknown": ((), "unknown", False),
    "rejected": ((OrderRejected("o-1", reason="no items"),), "too late", False),
}


@pytest.mark.parametrize(("stored", "verdict", "stores"), POINTS.values(), ids=POINTS.keys())
async def test_the_answer_at_each_point_of_the_flow(
    stored: tuple[Event, ...], verdict: str, stores: bool
) -> None:
    history = log_of(*stored)
    answer = await cancel.handle(REQUEST, history)
    assert answer.answer == verdict, answer
    assert answer.order_id == "o-1" and answer.request_id == "r-1" and answer.rule
    cancellation = await history.last("o-1", DeliveryCancelled)
    if stores:
        assert cancellation == DeliveryCancelled(
            "o-1", reason="changed my mind", request_id="r-1", requested_by="ann"
        )
    else:
        assert history.appended == list(stored)  # nothing new stored
    # The same request again (its answer lost): the same answer, nothing more stored.
    appended = list(history.appended)
    assert await cancel.handle(REQUEST, history) == answer
    assert history.appended == appended


async def test_the_rule_says_why_it_is_too_late() -> None:
    scheduled = await cancel.handle(REQUEST, log_of(CREATED, CHARGED, RESERVED, SCHEDULED))
    assert "delivery is already scheduled" in scheduled.rule
    failed = log_of(CREATED, FAILED, DeliveryCancelled("o-1", reason="payment failed: declined"))
    assert (await cancel.handle(REQUEST, failed)).rule == (
        "the order is already cancelled: payment failed: declined"
    )


async def test_a_second_request_is_accepted_naming_the_first() -> None:
    history = log_of(CREATED)
    assert (await cancel.handle(REQUEST, history)).answer == "accepted"
    other = CancelRequest("o-1", reason="duplicate", request_id="r-2")
    answer = await cancel.handle(other, history)
    assert answer.answer == "accepted" and answer.rule == "already cancelled on request r-1 by ann"
    assert answer.request_id == "r-2"


def test_a_request_without_an_id_gets_one_derived_from_what_it_asks() -> None:
    bare = CancelRequest("o-1", reason="changed my mind")
    assert cancel.identified(bare).request_id == cancel.identified(bare).request_id
    assert cancel.identified(bare).request_id.startswith("cancel-")
    other = CancelRequest("o-1", reason="another reason")
    assert cancel.identified(bare).request_id != cancel.identified(other).request_id
    assert cancel.identified(REQUEST) == REQUEST


class Interleaved:
    """A history that lets another handler run to its end just before this one's first append:
    the narrowest interleaving, where this one decided on what it read and the other got in."""

    def __init__(self, log: MemoryHistory, other: Callable[[], Awaitable[object]]) -> None:
        self.log = log
        self.other: Callable[[], Awaitable[object]] | None = other

    async def last(self, order_id: str, kind: type[E]) -> E | None:
        return await self.log.last(order_id, kind)

    async def append(self, event: Event) -> None:
        if self.other is not None:
            other, self.other = self.other, None
            await other()
        await self.log.append(event)


async def _end_of_failed_order(history: History) -> list[Event]:
    return list(await order.handle(UNAVAILABLE, history))


async def test_a_request_racing_a_failed_orders_end_either_way_agrees_with_the_end() -> None:
    # The request decides first and the order ends in between: the order's own
    # delivery.cancelled got in, so the request is too late and the end does not name it.
    log = log_of(CREATED, FAILED, UNAVAILABLE)
    ended: list[Event] = []

    async def order_ends() -> None:
        ended.extend(await _end_of_failed_order(log))

    answer = await cancel.handle(REQUEST, Interleaved(log, order_ends))
    assert answer.answer == "too late"
    assert ended == [OrderCancelled("o-1", reason="payment failed: card_declined; out of stock: "
                                                  "BOOK-42 (wanted 2, 1 left)")]  # fmt: skip

    # The order decides first and the request gets in between: the end names it.
    log = log_of(CREATED, FAILED, UNAVAILABLE)
    answers: list[object] = []

    async def request_arrives() -> None:
        answers.append(await cancel.handle(REQUEST, log))

    ending = await order.handle(UNAVAILABLE, Interleaved(log, request_arrives))
    assert [a.answer for a in answers] == ["accepted"]  # type: ignore[attr-defined]
    assert ending == [
        OrderCancelled(
            "o-1",
            reason="cancelled on request r-1 by ann: changed my mind",
            request_id="r-1",
            requested_by="ann",
        )
    ]


async def test_a_request_racing_delivery_is_decided_by_which_is_stored_first() -> None:
    log = log_of(CREATED, CHARGED, RESERVED)

    async def delivery_scheduled() -> None:
        assert log.record(SCHEDULED)

    answer = await cancel.handle(REQUEST, Interleaved(log, delivery_scheduled))
    assert answer.answer == "too late" and "delivery is already scheduled" in answer.rule
    assert await log.last("o-1", DeliveryCancelled) is None
    # The other way round: the log refuses delivery.scheduled once cancelled.
    log = log_of(CREATED, CHARGED, RESERVED)
    assert (await cancel.handle(REQUEST, log)).answer == "accepted"
    assert not log.record(SCHEDULED)
