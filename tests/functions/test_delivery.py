"""delivery: the join of paid and reserved schedules exactly once, whatever the arrival order."""

from __future__ import annotations

import pytest

from functions import delivery
from functions.events import DeliveryScheduled, Event, PaymentSucceeded, StockLine, StockReserved
from functions.history import MemoryHistory
from tests.logkit import schedules

PAID = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", [StockLine("BOOK-42", 2)])
SCHEDULED = DeliveryScheduled(
    "o-1", tracking_id=delivery.tracking_id("o-1"), carrier="orderflow-post"
)


def test_tracking_id_is_deterministic() -> None:
    assert delivery.tracking_id("o-1") == delivery.tracking_id("o-1")
    assert delivery.tracking_id("o-1") != delivery.tracking_id("o-2")
    assert delivery.tracking_id("o-1").startswith("TRK-")


async def test_every_schedule_of_the_two_halves_stores_one_delivery() -> None:
    played = await schedules(delivery.handle, [PAID, RESERVED])
    assert len(played) == 6  # store/handle of each half, every way they interleave
    for run in played:
        assert run.reactions == [SCHEDULED], run.schedule
        # The later-stored half's handler always finds the earlier one.
        assert any(answer == [SCHEDULED] for answer in run.answers), run.schedule
    # Both halves see each other when both are stored before either reads: both
    # answer, and the log takes one.
    both = [run for run in played if run.answers == [[SCHEDULED], [SCHEDULED]]]
    assert both and all(run.reactions == [SCHEDULED] for run in both)


@pytest.mark.parametrize("half", [PAID, RESERVED])
async def test_a_lone_half_emits_nothing(half: Event) -> None:
    history = MemoryHistory()
    history.record(half)
    assert await delivery.handle(half, history) == []
    assert await delivery.handle(half, history) == []  # nor on redelivery


@pytest.mark.parametrize("again", [PAID, RESERVED])
async def test_redelivery_after_scheduling_repeats_the_same_event(again: Event) -> None:
    history = MemoryHistory()
    for event in (PAID, RESERVED, SCHEDULED):
        history.record(event)
    assert await delivery.handle(again, history) == [SCHEDULED]
    assert not history.record(SCHEDULED)  # which the log refuses as stored already


async def test_delivery_handles_nothing_else() -> None:
    with pytest.raises(TypeError):
        await delivery.handle(SCHEDULED, MemoryHistory())
