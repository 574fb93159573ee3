"""Chaos: processes SIGKILLed every second and the server restarted once, mid-flow, in both modes.

A few hundred orders are published at a steady pace by a careful client while
random function processes are killed and restarted, and the nats-server is
SIGKILLed and brought back on its store once. Afterwards every order has
exactly one terminal event, no order was charged, reserved or delivered twice,
every compensation matches what was taken, and stock is conserved.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats.errors
import pytest

from functions.events import OrderCreated
from orderflow.config import MODES, Mode
from orderflow.demo import make_orders, payload
from tests.conftest import StartFlow
from tests.flowkit import Flow, terminal_counts

ORDERS = 300
PUBLISH_OVER = 6.0  # seconds
CHAOS_FOR = 9.0
SERVER_RESTART_AT = 4.0


async def _publish_carefully(flow: Flow, orders: list[OrderCreated]) -> None:
    """A client that retries until the stream acks; its message id makes retries harmless."""
    js = flow.nc.jetstream()
    for o in orders:
        for _ in range(200):
            try:
                await js.publish(
                    "orders.created", payload(o), headers={"Nats-Msg-Id": f"client:{o.order_id}"}
                )
                break
            except (TimeoutError, nats.errors.Error):
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"could not publish {o.order_id}")
        await asyncio.sleep(PUBLISH_OVER / len(orders))


async def _chaos(flow: Flow, rng: random.Random) -> dict[str, int]:
    start = time.monotonic()
    kills, restarted = 0, False
    while time.monotonic() - start < CHAOS_FOR:
        await asyncio.sleep(1.0)
        pids = flow.supervisor.pids()
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)
            kills += 1
        if not restarted and time.monotonic() - start >= SERVER_RESTART_AT:
            flow.server.kill()
            await asyncio.sleep(1.0)
            flow.server.start()
            restarted = True
    return {"kills": kills, "server_restarts": int(restarted)}


async def _gateway_records(flow: Flow, prefix: str) -> dict[str, int]:
    js = flow.nc.jetstream()
    info = await js.stream_info("KV_gateway", subjects_filter=f"$KV.gateway.{prefix}.>")
    return dict(info.state.subjects or {})


@pytest.mark.parametrize("mode", MODES)
async def test_chaos(
    start_flow: StartFlow, variant_config: Callable[..., Path], mode: Mode
) -> None:
    # Quick redelivery after a kill, and enough attempts that kills alone never
    # exhaust a message (each kill of a busy process costs its messages one).
    cfg = variant_config(("ack_wait: 5s", "ack_wait: 1s"), ("max_deliver: 8", "max_deliver: 30"))
    flow = await start_flow({"stock": 2, "delivery": 2}, config_path=cfg, mode=mode)
    orders = [o for _, o in make_orders(ORDERS, run_id="chaos", seed=2026)]
    ids = [o.order_id for o in orders]

    publisher = asyncio.create_task(_publish_carefully(flow, orders))
    done = await _chaos(flow, random.Random(2026))
    await publisher
    assert done["kills"] >= 7 and done["server_restarts"] == 1, done

    seen = await flow.wait_finished(ids, timeout=120)
    await flow.wait_quiet(timeout=60)
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)

    events = await flow.events()
    succeeded = {
        msgspec.json.decode(s.data)["order_id"] for s in events if s.subject == "payments.succeeded"
    }
    decided = succeeded | {
        msgspec.json.decode(s.data)["order_id"] for s in events if s.subject == "payments.failed"
    }
    for order_id in ids:
        subjects = seen[order_id]
        # A command may go out again if its deadline passed; every answer
        # and every outcome exactly once.
        for subject in {s for s in subjects if not s.startswith("saga.")} - {"orders.created"}:
            assert subjects.count(subject) == 1, (order_id, subjects)
        if "orders.completed" in subjects:
            assert {"payments.succeeded", "stock.reserved", "delivery.scheduled"} <= set(subjects)
            assert not {"payments.refunded", "stock.released"} & set(subjects)
        else:
            assert "delivery.scheduled" not in subjects
            if "payments.succeeded" in subjects:
                assert "payments.refunded" in subjects, (order_id, subjects)
            if "stock.reserved" in subjects:
                assert "stock.released" in subjects, (order_id, subjects)

    # One gateway record per decided charge, one per real refund: nothing doubled.
    assert len(await _gateway_records(flow, "charge")) == len(decided)
    refunded = [
        s
        for s in events
        if s.subject == "payments.refunded" and msgspec.json.decode(s.data)["charge_id"]
    ]
    assert len(await _gateway_records(flow, "refund")) == len(refunded)
    await flow.assert_stock_conserved()
    assert await flow.dead_letters() == []
