"""End to end on a real nats-server: every path, published as plain core messages."""

from __future__ import annotations

from functions.events import OrderCancelled, PaymentRefunded, PaymentSucceeded, StockReleased
from tests.conftest import StartFlow
from tests.flowkit import order, terminal_counts


async def test_every_path_ends_once_with_the_right_compensations(start_flow: StartFlow) -> None:
    flow = await start_flow()
    orders = {
        "happy": order("e2e-happy"),
        "declined": order("e2e-declined", token="tok_declined"),
        "flaky": order("e2e-flaky", token="tok_flaky"),
        "out_of_stock": order("e2e-oos", BOOK_42=1, SOLD_OUT_1=1),
        "both": order("e2e-both", token="tok_declined", SOLD_OUT_1=2),
    }
    await flow.publish(*orders.values())
    ids = [o.order_id for o in orders.values()]
    seen = await flow.wait_finished(ids, timeout=30)

    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    happy, declined, flaky, oos, both = (set(seen[i]) for i in ids)
    assert happy == {"orders.created", "payments.succeeded", "stock.reserved",
                     "delivery.scheduled", "orders.completed"}  # fmt: skip
    assert flaky == happy
    # Declined: whatever stock did, it gave it back before the order was cancelled.
    assert {"payments.failed", "stock.released", "orders.cancelled"} <= declined
    assert not declined & {"payments.succeeded", "delivery.scheduled", "orders.completed"}
    # Out of stock: the charge, if one was made, is refunded.
    assert {"stock.unavailable", "payments.refunded", "orders.cancelled"} <= oos
    assert not oos & {"stock.reserved", "delivery.scheduled", "orders.completed"}
    # Both failed: nothing was taken, so nothing is given back. Stock either
    # found the shelf empty, or heard of the decline first and never looked.
    assert {"payments.failed", "orders.cancelled"} <= both
    assert not both & {"payments.refunded", "stock.reserved"}
    assert len(both & {"stock.unavailable", "stock.released"}) == 1

    events = {f"{s.subject}:{s.event().order_id}": s.event() for s in await flow.events()}
    refund = events["payments.refunded:e2e-oos"]
    assert isinstance(refund, PaymentRefunded)
    if "payments.succeeded" in oos:
        charged = events["payments.succeeded:e2e-oos"]
        assert isinstance(charged, PaymentSucceeded)
        assert (refund.amount_cents, refund.charge_id) == (3000, charged.charge_id)
    else:
        assert (refund.amount_cents, refund.charge_id) == (0, None)
    if "stock.released" in both:
        assert events["stock.released:e2e-both"] == StockReleased("e2e-both", items=[])
    cancelled = events["orders.cancelled:e2e-both"]
    assert isinstance(cancelled, OrderCancelled) and "card_declined" in cancelled.reason
    await flow.assert_stock_conserved()
    await flow.assert_stock_conserved()
