"""order: exactly one terminal event per order, whatever the arrival order of its news."""

from __future__ import annotations

from itertools import permutations

import pytest

from functions import order
from functions.events import (
    TERMINAL_SUBJECTS,
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
    subject_of,
)
from functions.state import MemoryStore

LINES = [StockLine("BOOK-42", 2)]
SUCCEEDED = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
FAILED = PaymentFailed("o-1", 3000, reason="card_declined")
REFUNDED = PaymentRefunded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", LINES)
UNAVAILABLE = StockUnavailable("o-1", [Shortage("BOOK-42", 2, 1)])
RELEASED = StockReleased("o-1", LINES)
SCHEDULED = DeliveryScheduled("o-1", tracking_id="TRK-1")

COMPLETED = OrderCompleted("o-1", tracking_id="TRK-1")
OUT_OF_STOCK = "out of stock: BOOK-42 (wanted 2, 1 left)"
DECLINED = "payment failed: card_declined"


async def feed(store: MemoryStore, *events: Event) -> list[list[Event]]:
    return [list(await order.handle(event, store)) for event in events]


def terminals(answers: list[list[Event]]) -> list[Event]:
    return [e for events in answers for e in events if subject_of(type(e)) in TERMINAL_SUBJECTS]


async def test_completed_once_delivery_is_scheduled() -> None:
    answers = await feed(MemoryStore(), SUCCEEDED, RESERVED, SCHEDULED)
    assert answers == [[], [], [COMPLETED]]


async def test_cancelled_after_failed_payment_and_released_stock() -> None:
    answers = await feed(MemoryStore(), RESERVED, FAILED, RELEASED)
    assert answers == [[], [], [OrderCancelled("o-1", reason=DECLINED)]]


async def test_cancelled_after_failed_payment_and_unavailable_stock_names_both() -> None:
    answers = await feed(MemoryStore(), FAILED, UNAVAILABLE)
    assert answers[0] == []
    [cancelled] = answers[1]
    assert isinstance(cancelled, OrderCancelled)
    assert "card_declined" in cancelled.reason
    assert "BOOK-42" in cancelled.reason
    assert cancelled.reason == f"{DECLINED}; {OUT_OF_STOCK}"


@pytest.mark.parametrize(
    "events",
    [(SUCCEEDED, UNAVAILABLE, REFUNDED), (SUCCEEDED, REFUNDED, UNAVAILABLE)],
    ids=["unavailable-then-refunded", "refunded-then-unavailable"],
)
async def test_cancelled_after_unavailable_stock_and_refund(events: tuple[Event, ...]) -> None:
    answers = await feed(MemoryStore(), *events)
    assert answers == [[], [], [OrderCancelled("o-1", reason=OUT_OF_STOCK)]]


@pytest.mark.parametrize(
    "events",
    [(FAILED, RESERVED), (SUCCEEDED, UNAVAILABLE), (SUCCEEDED, RESERVED)],
    ids=["failed-but-held", "unavailable-but-charged", "not-yet-scheduled"],
)
async def test_no_terminal_while_one_side_still_holds_something(events: tuple[Event, ...]) -> None:
    assert await feed(MemoryStore(), *events) == [[] for _ in events]


PATHS: dict[str, tuple[tuple[Event, ...], Event]] = {
    "happy": ((SUCCEEDED, RESERVED, SCHEDULED), COMPLETED),
    "declined-after-reserve": (
        (FAILED, RESERVED, RELEASED),
        OrderCancelled("o-1", reason=DECLINED),
    ),
    "declined-and-out-of-stock": (
        (FAILED, UNAVAILABLE),
        OrderCancelled("o-1", reason=f"{DECLINED}; {OUT_OF_STOCK}"),
    ),
    "out-of-stock-after-charge": (
        (SUCCEEDED, UNAVAILABLE, REFUNDED),
        OrderCancelled("o-1", reason=OUT_OF_STOCK),
    ),
}


@pytest.mark.parametrize(("events", "terminal"), PATHS.values(), ids=PATHS.keys())
async def test_exactly_one_terminal_in_any_order(
    events: tuple[Event, ...], terminal: Event
) -> None:
    for ordering in permutations(events):
        store = MemoryStore()
        answers = await feed(store, *ordering)
        assert terminals(answers) == [terminal], ordering
        # Redelivered afterwards: the deciding event says it again, the rest say nothing.
        deciding = next(e for e, answer in zip(ordering, answers, strict=True) if answer)
        again = await feed(store, *ordering)
        expected = [[terminal] if e is deciding else [] for e in ordering]
        assert again == expected, ordering


async def test_late_news_after_completion_emits_nothing() -> None:
    store = MemoryStore()
    await feed(store, SUCCEEDED, RESERVED, SCHEDULED)
    assert await feed(store, SCHEDULED, SUCCEEDED, RESERVED) == [[COMPLETED], [], []]
