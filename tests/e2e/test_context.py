"""Every published event carries its context, chained hop by hop, compensations included, and
the schema version it was written with."""

from __future__ import annotations

import re
from collections import defaultdict

from functions.events import EVENT_TYPES
from orderflow.runtime import context as ctx
from orderflow.tools.streamlog import Stored
from tests.conftest import StartFlow
from tests.flowkit import order


async def test_headers_chain_every_hop(start_flow: StartFlow) -> None:
    flow = await start_flow()
    orders = [
        order("ctx-happy"),
        order("ctx-declined", token="tok_declined"),  # stock.released follows payments.failed
        order("ctx-oos", BOOK_42=1, SOLD_OUT_1=1),  # payments.refunded follows stock.unavailable
        order("ctx-flaky", token="tok_flaky"),
    ]
    await flow.publish(*orders)
    ids = [o.order_id for o in orders]
    await flow.wait_finished(ids, timeout=30)

    per_order: dict[str, list[Stored]] = defaultdict(list)
    for stored in await flow.events():
        per_order[stored.event().order_id].append(stored)

    consumes = {
        name: {s for c in fn.consumers for s in c.events}
        for name, fn in flow.topology.functions.items()
    }
    for order_id in ids:
        events = per_order[order_id]
        created, emitted = events[0], events[1:]
        assert created.subject == "orders.created" and created.headers == {}  # like `nats pub`
        ids_here = {f"ORDERS:{created.sequence}": created}
        ids_here |= {e.headers[ctx.EVENT_ID]: e for e in emitted}
        trace_ids = set()
        for e in emitted:
            h = e.headers
            assert h[ctx.EVENT_ID] == f"{e.kind}:{order_id}"
            assert h[ctx.CORRELATION_ID] == order_id
            assert h[ctx.SCHEMA_VERSION] == str(EVENT_TYPES[e.kind].schema_version)
            assert e.kind in flow.topology.functions[h[ctx.FUNCTION]].emits
            cause = ids_here[h[ctx.CAUSATION_ID]]  # the cause is an event of the same order...
            assert cause.sequence < e.sequence  # ...logged before it...
            assert cause.kind in consumes[h[ctx.FUNCTION]]  # ...that its emitter consumes
            match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", h[ctx.TRACEPARENT])
            assert match is not None
            trace_ids.add(match[1])
        assert len(trace_ids) == 1, "one trace per order"

    # The compensations name the failures that caused them.
    def cause_of(order_id: str, subject: str) -> str:
        [e] = [e for e in per_order[order_id] if e.kind == subject]
        return e.headers[ctx.CAUSATION_ID]

    assert cause_of("ctx-declined", "stock.released") == "payments.failed:ctx-declined"
    # A refund is a join: whichever of the shortage and the charge was stored
    # later caused it (orders.created, when its handler found the shortage).
    created_oos = f"ORDERS:{per_order['ctx-oos'][0].sequence}"
    assert cause_of("ctx-oos", "payments.refunded") in ("stock.unavailable:ctx-oos", created_oos)
    assert cause_of("ctx-happy", "orders.completed") == "delivery.scheduled:ctx-happy"
    # The flaky card's retry is in the log too.
    retries = [
        s for s in await flow.read("RETRIES") if s.headers.get(ctx.CORRELATION_ID) == "ctx-flaky"
    ]
    assert [r.headers[ctx.FUNCTION] for r in retries] == ["payment"]
