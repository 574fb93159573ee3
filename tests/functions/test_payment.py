"""payment: charge once through the gateway, refund once, whatever the arrival order."""

from __future__ import annotations

import pytest

from functions import payment
from functions.events import (
    DeliveryCancelled,
    Event,
    OrderCreated,
    OrderItem,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    Shortage,
    StockUnavailable,
)
from functions.history import History, MemoryHistory
from functions.payment import GatewayUnavailable
from functions.state import MemoryStore
from orderflow.runtime.gateway import RefundRecord, SimulatedGateway
from tests.logkit import schedules

TOTAL = 2 * 1500 + 250
UNAVAILABLE = StockUnavailable("o-1", [Shortage("BOOK-42", 2, 0)])


def placed(token: str = "tok_visa") -> OrderCreated:
    items = [OrderItem("BOOK-42", 2, 1500), OrderItem("PEN-1", 1, 250)]
    return OrderCreated("o-1", "c-7", items, payment_token=token)


class Payments:
    """The payment function with the order's history and the gateway's own memory."""

    def __init__(self) -> None:
        self.history = MemoryHistory()
        self.gateway_store = MemoryStore()
        self.gateway = SimulatedGateway(self.gateway_store)

    async def handle(self, event: Event, history: History | None = None) -> list[Event]:
        """Store the input, handle it, store what it answered: as the log would."""
        log = self.history if history is None else history
        if isinstance(log, MemoryHistory):
            log.record(event)
        answer = list(await payment.handle(event, log, self.gateway))
        if isinstance(log, MemoryHistory):
            for out in answer:
                log.record(out)
        return answer

    async def created(self, token: str = "tok_visa") -> list[Event]:
        return await self.handle(placed(token))

    async def unavailable(self) -> list[Event]:
        return await self.handle(UNAVAILABLE)

    def gateway_keys(self, prefix: str) -> list[str]:
        return [key for key in self.gateway_store.data if key.startswith(prefix)]


async def test_charges_the_total() -> None:
    p = Payments()
    [event] = await p.created("tok_visa")
    assert isinstance(event, PaymentSucceeded)
    assert event.order_id == "o-1"
    assert event.amount_cents == TOTAL
    assert event.charge_id.startswith("ch_")


async def test_declined_card_fails_with_a_reason() -> None:
    p = Payments()
    assert await p.created("tok_declined") == [PaymentFailed("o-1", TOTAL, reason="card_declined")]
    assert await p.created("tok_declined") == [PaymentFailed("o-1", TOTAL, reason="card_declined")]


async def test_flaky_gateway_raises_then_charges_once() -> None:
    p = Payments()
    with pytest.raises(GatewayUnavailable):
        await p.created("tok_flaky")
    second = await p.created("tok_flaky")
    third = await p.created("tok_flaky")
    assert len(second) == 1
    assert isinstance(second[0], PaymentSucceeded)
    assert second[0].amount_cents == TOTAL
    assert third == second  # the gateway's idempotency key: its first answer again
    assert p.gateway_keys("charge.") == [f"charge.{payment.charge_key('o-1')}"]


async def test_stock_unavailable_refunds_a_charge_once() -> None:
    p = Payments()
    [charged] = await p.created()
    assert isinstance(charged, PaymentSucceeded)
    expected = [PaymentRefunded("o-1", TOTAL, charge_id=charged.charge_id)]
    assert await p.unavailable() == expected
    assert await p.unavailable() == expected
    assert p.gateway_keys("refund.") == [f"refund.{payment.refund_key('o-1')}"]
    refund = await p.gateway_store.get(f"refund.{payment.refund_key('o-1')}", RefundRecord)
    assert refund is not None
    assert refund.value == RefundRecord(charged.charge_id, TOTAL)
    # A redelivered orders.created charges nothing new and refunds nothing twice.
    assert await p.created() == [charged, *expected]
    assert len(p.gateway_keys("refund.")) == 1


async def test_every_schedule_of_charge_and_shortage_refunds_exactly_once() -> None:
    # The charge's handler appends its decision before it reads for the
    # shortage; the shortage is stored before its handler reads for the charge.
    for token in ("tok_visa", "tok_declined"):
        gateway = SimulatedGateway(MemoryStore())

        async def handle(event: Event, history: History) -> list[Event]:
            return list(await payment.handle(event, history, gateway))  # noqa: B023

        played = await schedules(handle, [placed(token), UNAVAILABLE])
        assert len(played) == 6
        for run in played:
            kinds = sorted(type(e).__name__ for e in run.reactions)
            if token == "tok_visa":
                assert kinds == ["PaymentRefunded", "PaymentSucceeded"], run.schedule
            else:
                assert kinds == ["PaymentFailed"], run.schedule


async def test_a_shortage_before_an_unknown_charge_waits_for_nothing() -> None:
    # The gateway does not answer: the charge stays undecided (its message is
    # retried, then dead-lettered). The shortage must not become a second
    # message retried into a second dead letter: it answers nothing, at once.
    p = Payments()
    p.history.record(placed("tok_flaky"))
    with pytest.raises(GatewayUnavailable):
        await payment.handle(placed("tok_flaky"), p.history, p.gateway)
    assert await p.unavailable() == []
    # The gateway answers (a redrive): charged and refunded, once each.
    charged, refunded = await p.created("tok_flaky")
    assert isinstance(charged, PaymentSucceeded)
    assert refunded == PaymentRefunded("o-1", TOTAL, charge_id=charged.charge_id)
    assert len(p.gateway_keys("charge.")) == 1
    assert len(p.gateway_keys("refund.")) == 1


async def test_stock_unavailable_after_a_decline_emits_nothing() -> None:
    p = Payments()
    await p.created("tok_declined")
    assert await p.unavailable() == []
    assert p.gateway_keys("refund.") == []


async def test_payment_handles_nothing_else() -> None:
    with pytest.raises(TypeError):
        await Payments().handle(PaymentRefunded("o-1", 1, charge_id="x"))


REQUESTED = DeliveryCancelled("o-1", reason="changed my mind", request_id="r-1", requested_by="ann")


async def test_an_order_cancelled_before_payment_saw_it_is_never_charged() -> None:
    p = Payments()
    p.history.record(REQUESTED)
    answer = await p.created()
    assert answer == [PaymentFailed("o-1", TOTAL, reason="not charged: cancelled on request r-1")]
    assert p.gateway_keys("charge") == []  # the gateway was never asked
    assert await p.handle(REQUESTED) == []  # nothing to refund


async def test_every_schedule_of_charge_and_cancellation_refunds_exactly_once() -> None:
    gateway = SimulatedGateway(MemoryStore())

    async def handle(event: Event, history: History) -> list[Event]:
        return list(await payment.handle(event, history, gateway))

    played = await schedules(handle, [placed(), REQUESTED])
    assert played
    for run in played:
        kinds = sorted(type(e).__name__ for e in run.reactions)
        # Charged then refunded, or never charged: money never stays taken.
        assert kinds in (["PaymentRefunded", "PaymentSucceeded"], ["PaymentFailed"]), run.schedule


async def test_a_failed_orders_own_cancellation_asks_for_nothing() -> None:
    p = Payments()
    await p.created()
    closed = DeliveryCancelled("o-1", reason="out of stock")  # no request: order closed it
    assert await p.handle(closed) == []
    assert p.gateway_keys("refund") == []


async def test_orchestrated_payment_does_not_watch_for_cancellations() -> None:
    history = MemoryHistory()
    history.record(REQUESTED)
    gateway = SimulatedGateway(MemoryStore())
    answer = await payment.handle(placed(), history, gateway, cancellable=False)
    assert [type(e) for e in answer] == [PaymentSucceeded]  # the orchestrator refunds
