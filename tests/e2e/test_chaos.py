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

import pytest

from orderflow.config import MODES, Mode
from orderflow.tools.demo import make_orders
from tests.conftest import StartFlow
from tests.flowkit import Flow, assert_every_effect_once, publish_carefully

ORDERS = 300
PUBLISH_OVER = 6.0  # seconds
CHAOS_FOR = 9.0
SERVER_RESTART_AT = 4.0


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

    publisher = asyncio.create_task(publish_carefully(flow, orders, PUBLISH_OVER))
    done = await _chaos(flow, random.Random(2026))
    await publisher
    assert done["kills"] >= 7 and done["server_restarts"] == 1, done

    seen = await flow.wait_finished(ids, timeout=120)
    await flow.wait_quiet(timeout=60)
    await assert_every_effect_once(flow, ids, seen)
    assert await flow.dead_letters() == []
