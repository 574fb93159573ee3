"""Two processes of stock and of delivery share their consumers without doubling any effect."""

from __future__ import annotations

import msgspec

from orderflow.tools.demo import make_orders
from tests.conftest import StartFlow
from tests.flowkit import terminal_counts


async def test_two_replicas_of_stock_and_delivery(start_flow: StartFlow) -> None:
    flow = await start_flow({"stock": 2, "delivery": 2})
    assert len(flow.supervisor.pids("stock")) == 2 and len(flow.supervisor.pids("delivery")) == 2
    orders = [o for _, o in make_orders(300, run_id="rep", seed=11)]
    await flow.publish(*orders)
    ids = [o.order_id for o in orders]
    seen = await flow.wait_finished(ids, timeout=90)

    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    completed = [o for o in ids if "orders.completed" in seen[o]]
    assert completed, "the mix must include completed orders"
    for order_id in ids:
        subjects = seen[order_id]
        assert subjects.count("stock.reserved") <= 1
        # Scheduled exactly for the completed orders, once each.
        assert subjects.count("delivery.scheduled") == (order_id in completed)
    # No double reservation: a second decrement would break conservation.
    await flow.assert_stock_conserved()
    tracking = [
        msgspec.json.decode(s.data)["tracking_id"]
        for s in await flow.events()
        if s.kind == "delivery.scheduled"
    ]
    assert len(tracking) == len(set(tracking)) == len(completed)
