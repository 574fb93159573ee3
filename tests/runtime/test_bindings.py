"""bindings: in orchestration mode the same handlers take commands, as the events they stand for."""

from __future__ import annotations

import pytest

from functions.events import (
    ChargePayment,
    DeliveryScheduled,
    PaymentFailed,
    PaymentSucceeded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleDelivery,
    StockLine,
    StockReserved,
    StockUnavailable,
)
from functions.history import MemoryHistory
from functions.state import MemoryStore
from orderflow import config
from orderflow.config import ConfigError
from orderflow.runtime.bindings import as_events, build_handler
from tests.conftest import ROOT
from tests.flowkit import order

PLACED = order("o-1")
PAID = PaymentSucceeded("o-1", 3000, charge_id="ch_1")
RESERVED = StockReserved("o-1", [StockLine("BOOK-42", 2)])


def test_each_command_is_the_event_choreography_would_send() -> None:
    assert as_events(ChargePayment("o-1", 1, order=PLACED)) == [PLACED]
    assert as_events(ReserveStock("o-1", 2, order=PLACED)) == [PLACED]
    assert as_events(RefundPayment("o-1", 1, reason="r")) == [StockUnavailable("o-1", [])]
    assert as_events(ReleaseStock("o-1", 1, reason="r")) == [PaymentFailed("o-1", 0, "r")]
    schedule = ScheduleDelivery("o-1", 1, payment=PAID, stock=RESERVED)
    assert as_events(schedule) == [PAID, RESERVED]


async def test_delivery_answers_a_redelivered_command_once() -> None:
    topology = config.load(ROOT / "streams.yaml", "orchestration")
    store = MemoryStore()
    handler = build_handler(topology, "delivery", lambda bucket: store)
    history = MemoryHistory()
    for half in (PAID, RESERVED):  # in the log before the orchestrator asks
        history.record(half)
    command = ScheduleDelivery("o-1", 1, payment=PAID, stock=RESERVED)
    first = await handler(command, history)
    # Both halves find the other in the order's history and answer; once is enough.
    assert [type(e) for e in first] == [DeliveryScheduled]
    assert list(await handler(command, history)) == list(first)


def test_the_order_function_is_not_bound_in_orchestration_mode() -> None:
    topology = config.load(ROOT / "streams.yaml", "orchestration")
    with pytest.raises(ConfigError, match="no handler is bound to this name in orchestration"):
        build_handler(topology, "order", lambda bucket: MemoryStore())
