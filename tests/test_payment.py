"""payment: charge once through the gateway, refund once, never charge a voided order."""

from __future__ import annotations

import pytest

from functions import payment
from functions.events import (
    Event,
    OrderCreated,
    OrderItem,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    Shortage,
    StockUnavailable,
)
from functions.payment import GatewayUnavailable, PaymentRecord
from functions.state import MemoryStore
from orderflow.gateway import RefundRecord, SimulatedGateway


class Payments:
    """The payment function's state and the gateway's own, each in its own store."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.gateway_store = MemoryStore()
        self.gateway = SimulatedGateway(self.gateway_store)

    async def created(self, token: str = "tok_visa") -> list[Event]:
        items = [OrderItem("BOOK-42", 2, 1500), OrderItem("PEN-1", 1, 250)]
        event = OrderCreated("o-1", "c-7", items, payment_token=token)
        return list(await payment.handle(event, self.store, self.gateway))

    async def unavailable(self) -> list[Event]:
        event = StockUnavailable("o-1", [Shortage("BOOK-42", 2, 0)])
        return list(await payment.handle(event, self.store, self.gateway))

    def gateway_keys(self, prefix: str) -> list[str]:
        return [key for key in self.gateway_store.data if key.startswith(prefix)]

    async def record(self) -> PaymentRecord:
        found = await self.store.get(payment.payment_key("o-1"), PaymentRecord)
        assert found is not None
        return found.value


TOTAL = 2 * 1500 + 250


async def test_charges_the_total() -> None:
    p = Payments()
    [event] = await p.created("tok_visa")
    assert isinstance(event, PaymentSucceeded)
    assert event.order_id == "o-1"
    assert event.amount_cents == TOTAL
    assert event.charge_id.startswith("ch_")
    assert (await p.record()).status == "charged"


async def test_declined_card_fails_with_a_reason() -> None:
    p = Payments()
    assert await p.created("tok_declined") == [PaymentFailed("o-1", TOTAL, reason="card_declined")]
    assert await p.created("tok_declined") == [PaymentFailed("o-1", TOTAL, reason="card_declined")]


async def test_flaky_gateway_raises_then_charges_once() -> None:
    p = Payments()
    with pytest.raises(GatewayUnavailable):
        await p.created("tok_flaky")
    assert (await p.record()).status == "charging"
    second = await p.created("tok_flaky")
    third = await p.created("tok_flaky")
    assert len(second) == 1
    assert isinstance(second[0], PaymentSucceeded)
    assert second[0].amount_cents == TOTAL
    assert third == second  # same charge_id: the redelivery is answered from the record
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
    # A redelivered orders.created still reports the (refunded) charge, and charges nothing new.
    assert await p.created() == [charged]


async def test_stock_unavailable_first_is_recorded_and_the_charge_refunds_it() -> None:
    p = Payments()
    assert await p.unavailable() == []  # recorded, not retried: nothing to refund yet
    assert (await p.record()).refund_due
    assert await p.unavailable() == []  # a redelivery records nothing new
    assert p.gateway_keys("charge.") == []
    # Deciding the charge refunds it at once and answers both: the same events
    # as in the usual arrival order.
    charged, refunded = await p.created()
    assert isinstance(charged, PaymentSucceeded)
    assert charged.amount_cents == TOTAL
    assert refunded == PaymentRefunded("o-1", TOTAL, charge_id=charged.charge_id)
    assert len(p.gateway_keys("refund.")) == 1
    # Redeliveries of either input answer the same, and refund nothing twice.
    assert await p.created() == [charged, refunded]
    assert await p.unavailable() == [refunded]
    assert len(p.gateway_keys("refund.")) == 1


async def test_stock_unavailable_during_an_unknown_charge_is_recorded_not_retried() -> None:
    # The gateway does not answer: the charge stays undecided (its message is
    # retried, then dead-lettered), and the refund asked for meanwhile must not
    # become a second message retried into a second dead letter.
    p = Payments()
    with pytest.raises(GatewayUnavailable):
        await p.created("tok_flaky")
    assert await p.unavailable() == []
    record = await p.record()
    assert (record.status, record.refund_due) == ("charging", True)
    # The gateway answers (a redrive): charged and refunded, once each.
    charged, refunded = await p.created("tok_flaky")
    assert isinstance(charged, PaymentSucceeded)
    assert refunded == PaymentRefunded("o-1", TOTAL, charge_id=charged.charge_id)
    assert len(p.gateway_keys("charge.")) == 1
    assert len(p.gateway_keys("refund.")) == 1


async def test_a_refund_due_on_a_declined_charge_gives_nothing_back() -> None:
    p = Payments()
    assert await p.unavailable() == []
    [failed] = await p.created("tok_declined")
    assert isinstance(failed, PaymentFailed)
    assert await p.unavailable() == []
    assert p.gateway_keys("refund.") == []


async def test_stock_unavailable_after_a_decline_emits_nothing() -> None:
    p = Payments()
    await p.created("tok_declined")
    assert await p.unavailable() == []
    assert p.gateway_keys("refund.") == []
    assert (await p.record()).status == "declined"
