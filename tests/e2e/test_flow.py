"""End to end on a real nats-server: every path, published as plain core messages."""

from __future__ import annotations

from functions.events import (
    OrderCancelled,
    PaymentRefunded,
    PaymentSucceeded,
    StockReleased,
    StockReserved,
)
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
    # Declined: the reservation is released before the order is cancelled (and
    # its delivery decision closed: it will not be delivered).
    assert declined == {"orders.created", "payments.failed", "stock.reserved", "stock.released",
                        "delivery.cancelled", "orders.cancelled"}  # fmt: skip
    # Out of stock: the charge is refunded.
    assert oos == {"orders.created", "payments.succeeded", "stock.unavailable",
                   "payments.refunded", "delivery.cancelled", "orders.cancelled"}  # fmt: skip
    # Both failed: nothing was taken, so nothing is given back.
    assert both == {"orders.created", "payments.failed", "stock.unavailable",
                    "delivery.cancelled", "orders.cancelled"}  # fmt: skip

    events = {f"{s.kind}:{s.event().order_id}": s.event() for s in await flow.events()}
    charged = events["payments.succeeded:e2e-oos"]
    assert isinstance(charged, PaymentSucceeded)
    assert events["payments.refunded:e2e-oos"] == PaymentRefunded(
        "e2e-oos", 3000, charge_id=charged.charge_id
    )
    reserved = events["stock.reserved:e2e-declined"]
    assert isinstance(reserved, StockReserved)
    assert events["stock.released:e2e-declined"] == StockReleased("e2e-declined", reserved.items)
    cancelled = events["orders.cancelled:e2e-both"]
    assert isinstance(cancelled, OrderCancelled)
    assert "card_declined" in cancelled.reason and "SOLD-OUT-1" in cancelled.reason
    await flow.assert_stock_conserved()
    await flow.assert_stock_conserved()
