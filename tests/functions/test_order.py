"""order: exactly one terminal event per order, whatever the arrival order of its news."""

from __future__ import annotations

import pytest

from functions import order
from functions.errors import Permanent
from functions.events import (
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    Shortage,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
)
from functions.history import MemoryHistory
from tests.logkit import schedules

LINES = [StockLine("BOOK-42", 2)]
SUCCEEDED = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
FAILED = PaymentFailed("o-1", 3000, reason="card_declined")
REFUNDED = PaymentRefunded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", LINES)
UNAVAILABLE = StockUnavailable("o-1", [Shortage("BOOK-42", 2, 1)])
RELEASED = StockReleased("o-1", LINES)
SCHEDULED = DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post")

REQUESTED = DeliveryCancelled("o-1", reason="changed my mind", request_id="r-1", requested_by="ann")

COMPLETED = OrderCompleted("o-1", tracking_id="TRK-1")
OUT_OF_STOCK = "out of stock: BOOK-42 (wanted 2, 1 left)"
DECLINED = "payment failed: card_declined"

# Per path: what is stored before (order does not read it), the outcomes order
# reads (streams.yaml binds only those), and the one terminal event.
PATHS: dict[str, tuple[tuple[Event, ...], tuple[Event, ...], Event]] = {
    "happy": ((SUCCEEDED, RESERVED), (SCHEDULED,), COMPLETED),
    "declined-after-reserve": (
        (RESERVED,),
        (FAILED, RELEASED),
        OrderCancelled("o-1", reason=DECLINED),
    ),
    "declined-and-out-of-stock": (
        (),
        (FAILED, UNAVAILABLE),
        OrderCancelled("o-1", reason=f"{DECLINED}; {OUT_OF_STOCK}"),
    ),
    "out-of-stock-after-charge": (
        (SUCCEEDED,),
        (UNAVAILABLE, REFUNDED),
        OrderCancelled("o-1", reason=OUT_OF_STOCK),
    ),
    "cancelled-on-request-after-reserve": (
        (SUCCEEDED, RESERVED, REQUESTED),
        (REFUNDED, RELEASED),
        OrderCancelled(
            "o-1",
            reason="cancelled on request r-1 by ann: changed my mind",
            request_id="r-1",
            requested_by="ann",
        ),
    ),
}


@pytest.mark.parametrize(("before", "outcomes", "terminal"), PATHS.values(), ids=PATHS.keys())
async def test_every_schedule_stores_exactly_one_terminal_event(
    before: tuple[Event, ...], outcomes: tuple[Event, ...], terminal: Event
) -> None:
    played = await schedules(order.handle, outcomes, before)
    assert played
    for run in played:
        assert run.reactions == [terminal], run.schedule
        # A cancelled order's delivery decision is closed, once, before it ends.
        decisions = [e for e in run.history.appended if isinstance(e, DeliveryCancelled)]
        expected = 0 if isinstance(terminal, OrderCompleted) else 1
        assert len(decisions) == expected, run.schedule
        if decisions:
            assert run.history.appended.index(decisions[0]) < run.history.appended.index(
                run.reactions[0]
            )
        # Whoever decides says the same: the reason does not depend on who saw what.
        assert all(answer in ([], [terminal]) for answer in run.answers), run.schedule


@pytest.mark.parametrize(
    ("stored", "news"),
    [((RESERVED,), FAILED), ((SUCCEEDED,), UNAVAILABLE), ((SUCCEEDED,), RESERVED)],
    ids=["failed-but-held", "unavailable-but-charged", "not-yet-scheduled"],
)
async def test_no_terminal_while_one_side_still_holds_something(
    stored: tuple[Event, ...], news: Event
) -> None:
    history = MemoryHistory()
    for event in (*stored, news):
        history.record(event)
    if isinstance(news, StockReserved):
        with pytest.raises(TypeError):  # not bound in streams.yaml: it decides nothing
            await order.handle(news, history)
        return
    assert await order.handle(news, history) == []


async def test_late_news_after_the_end_says_the_same_again() -> None:
    # The log refuses a second terminal event, so answering again is harmless,
    # and it is what a redelivery after a crash between decide and publish needs.
    history = MemoryHistory()
    for event in (FAILED, UNAVAILABLE):
        history.record(event)
    first = await order.handle(UNAVAILABLE, history)
    assert [type(e) for e in first] == [OrderCancelled]
    assert history.record(first[0])
    assert await order.handle(FAILED, history) == first
    assert await order.handle(UNAVAILABLE, history) == first
    assert not history.record(first[0])


def test_reason_names_the_payment_first() -> None:
    assert order.reason([UNAVAILABLE, FAILED]) == f"{DECLINED}; {OUT_OF_STOCK}"
    assert order.reason([REFUNDED, RELEASED]) == ""


async def test_a_cancelled_order_whose_delivery_was_scheduled_is_a_bug_not_a_guess() -> None:
    history = MemoryHistory()
    for event in (SUCCEEDED, RESERVED, SCHEDULED, FAILED, RELEASED):
        history.record(event)
    with pytest.raises(Permanent, match="settled both ways"):
        await order.handle(RELEASED, history)
