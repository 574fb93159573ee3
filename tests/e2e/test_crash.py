"""Effects happen once: a function process SIGKILLs itself at the worst moments.

Each case crashes one function once, at one failpoint (see
``orderflow/runtime/failpoints.py``), while it handles one order: after the gateway
charged but before payment recorded it, after a handler committed its state
but before it published, and after it published but before it acked. The
supervisor restarts the process, the input is redelivered after ack_wait, and
the order must still end exactly once with no effect doubled or lost. Stock is
also killed between its own writes (no write spans two keys: a reservation is
a few single-key writes), after the n-th write of a given key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from functions.events import OrderCreated
from tests.conftest import StartFlow
from tests.flowkit import Flow, order, terminal_counts

HAPPY = order("crash-1")
OUT_OF_STOCK = order("crash-1", BOOK_42=1, SOLD_OUT_1=1)
DECLINED = order("crash-1", token="tok_declined")
TWO_SKUS = order("crash-1", BOOK_42=2, MUG_7=1)
TWO_SKUS_DECLINED = order("crash-1", token="tok_declined", BOOK_42=2, MUG_7=1)

CASES = [
    # (failpoint, function, input subject, order, outcome, the effect to count)
    ("after-charge", "payment", "orders.created", HAPPY, "completed"),
    ("after-handle", "payment", "orders.created", HAPPY, "completed"),
    ("after-publish", "payment", "orders.created", HAPPY, "completed"),
    ("after-handle", "payment", "stock.unavailable", OUT_OF_STOCK, "cancelled"),
    ("after-publish", "payment", "stock.unavailable", OUT_OF_STOCK, "cancelled"),
    ("after-handle", "stock", "orders.created", HAPPY, "completed"),
    ("after-publish", "stock", "orders.created", HAPPY, "completed"),
    ("after-handle", "stock", "payments.failed", DECLINED, "cancelled"),
    ("after-publish", "stock", "payments.failed", DECLINED, "cancelled"),
    ("after-handle", "delivery", "payments.succeeded", HAPPY, "completed"),
    ("after-handle", "delivery", "stock.reserved", HAPPY, "completed"),
    ("after-publish", "delivery", "stock.reserved", HAPPY, "completed"),
    ("after-handle", "order", "delivery.scheduled", HAPPY, "completed"),
    ("after-publish", "order", "delivery.scheduled", HAPPY, "completed"),
    # No stock write spans two keys, so stock can also die between its writes
    # (after-write: the third field is the key and which write of it):
    # BOOK-42 taken (MUG-7 maybe), nothing decided;
    ("after-write", "stock", "level.BOOK-42:1", TWO_SKUS, "completed"),
    # the reservation decided, the levels' proofs not settled;
    ("after-write", "stock", "order.crash-1:1", TWO_SKUS, "completed"),
    # BOOK-42 given back (its 3rd write: taken, settled, given back), not decided;
    ("after-write", "stock", "level.BOOK-42:3", TWO_SKUS_DECLINED, "cancelled"),
    # the release decided, not settled.
    ("after-write", "stock", "order.crash-1:2", TWO_SKUS_DECLINED, "cancelled"),
]


async def _kv_keys(nc: Client, bucket: str, prefix: str) -> dict[str, int]:
    """Keys under ``prefix`` with how many values each holds (history is 1: at most 1)."""
    info = await nc.jetstream().stream_info(
        f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{prefix}>"
    )
    return dict(info.state.subjects or {})


async def _assert_effects_once(flow: Flow, o: OrderCreated, outcome: str) -> None:
    seen = await flow.wait_finished([o.order_id], timeout=30)
    assert terminal_counts(seen, [o.order_id]) == {o.order_id: 1}
    subjects = seen[o.order_id]
    assert f"orders.{outcome}" in subjects
    for subject in set(subjects):
        assert subjects.count(subject) == 1, subjects
    # The gateway keeps one record per real charge and per real refund.
    charges = await _kv_keys(flow.nc, "gateway", "charge.")
    refunds = await _kv_keys(flow.nc, "gateway", "refund.")
    charged = "payments.succeeded" in subjects
    assert len(charges) == (1 if charged or o.payment_token == "tok_declined" else 0)
    assert len(refunds) == (1 if charged and "payments.refunded" in subjects else 0)
    if outcome == "cancelled" and charged:
        assert "payments.refunded" in subjects  # the charge was given back
    if "stock.reserved" in subjects and outcome == "cancelled":
        assert "stock.released" in subjects  # the reservation was given back
    await flow.assert_stock_conserved()


@pytest.mark.parametrize(
    ("point", "function", "subject", "o", "outcome"),
    CASES,
    ids=[f"{c[1]}-{c[0]}-on-{c[2]}" for c in CASES],
)
async def test_crash_at_the_worst_moment(
    start_flow: StartFlow,
    variant_config: Callable[..., Path],
    tmp_path: Path,
    point: str,
    function: str,
    subject: str,
    o: OrderCreated,
    outcome: str,
) -> None:
    # A short ack_wait: the redelivery after the crash comes in 1 s, not 5.
    config = variant_config(("ack_wait: 5s", "ack_wait: 1s"))
    marker = tmp_path / "crashed"
    env = {
        "ORDERFLOW_CRASH": f"{point}:{function}:{o.order_id}:{subject}",
        "ORDERFLOW_CRASH_MARKER": str(marker),
    }
    if point == "after-charge":  # the gateway knows idempotency keys, not orders or subjects
        env["ORDERFLOW_CRASH"] = f"{point}:{function}:charge-{o.order_id}"
    if point == "after-write":  # the store knows its bucket and keys
        env["ORDERFLOW_CRASH"] = f"{point}:stock:{subject}"
    flow = await start_flow(config_path=config, env=env)
    before = set(flow.supervisor.pids(function))
    await flow.publish(o)
    for _ in range(100):
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.exists(), "the failpoint was never reached"
    await _assert_effects_once(flow, o, outcome)
    assert not set(flow.supervisor.pids(function)) & before, "the process really died"
