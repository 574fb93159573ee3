"""Retries that back off, explicit permanent failures, long handlers, draining on stop."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.errors import Permanent
from functions.events import Event, PaymentSucceeded, event_id
from functions.history import History
from orderflow import config
from orderflow.config import Topology
from orderflow.ops.provision import provision
from orderflow.runtime.deadletter import TIME
from orderflow.runtime.pipeline import Handler
from orderflow.runtime.worker import Worker
from tests.conftest import StartFlow
from tests.flowkit import order

SCHEDULE = (0.3, 0.6, 1.2)
TOLERANCE = 0.25  # scheduling, a fetch round trip and a loaded 2-core CI machine


async def test_transient_failures_follow_the_backoff_schedule_then_dead_letter(
    start_flow: StartFlow, variant_config: Callable[..., Path]
) -> None:
    cfg = variant_config(
        ("backoff: [200ms, 1s, 5s, 15s]", "backoff: [300ms, 600ms, 1200ms]"),
        ("max_deliver: 8", "max_deliver: 4"),
    )
    flow = await start_flow(config_path=cfg)
    naks: list[datetime] = []

    async def on_nak(msg: Msg) -> None:
        naks.append(datetime.fromisoformat(json.loads(msg.data)["timestamp"]))

    await flow.nc.subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.ORDERS.payment", cb=on_nak)
    await flow.publish(order("o-down-1", token="tok_unavailable"))  # the gateway never answers

    for _ in range(100):
        letters = [d for d in await flow.dead_letters() if d.function == "payment"]
        if letters:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("never dead-lettered")
    letter = letters[0]
    assert letter.deliveries == 4
    assert "failed 4 attempts; last error: GatewayUnavailable" in letter.reason

    # Three naks (attempts 1-3), then the fourth attempt is dead-lettered.
    assert len(naks) == 3
    moments = [*naks, datetime.fromisoformat(letter.headers[TIME])]
    waits = [(b - a).total_seconds() for a, b in itertools.pairwise(moments)]
    for waited, planned in zip(waits, SCHEDULE, strict=True):
        assert planned - 0.02 <= waited <= planned + TOLERANCE, (waits, SCHEDULE)


async def _run_worker(
    nc: Client, topology: Topology, function: str, handler: Handler
) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(nc, topology, function, handler).run(stop))
    return stop, task


async def _publish_paid(nc: Client, *order_ids: str) -> None:
    js = nc.jetstream()
    for order_id in order_ids:
        event = PaymentSucceeded(order_id, 100, charge_id=f"ch-{order_id}")
        headers = {"Nats-Msg-Id": event_id(event)}
        body = b'{"order_id":"%s","amount_cents":100,"charge_id":"ch"}' % order_id.encode()
        await js.publish(f"order.{order_id}.payments.succeeded", body, headers=headers)


async def test_permanent_failure_is_dead_lettered_at_once(
    provisioned: Client, topology: Topology
) -> None:
    async def handler(event: Event, history: History) -> Sequence[Event]:
        raise Permanent("no warehouse serves this address")

    stop, task = await _run_worker(provisioned, topology, "delivery", handler)
    await _publish_paid(provisioned, "o-perm-1")
    for _ in range(50):
        letters = [d for d in await _letters(provisioned, topology) if d.function == "delivery"]
        if letters:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    assert [(d.deliveries, d.reason) for d in letters] == [
        (1, "permanent failure: no warehouse serves this address")
    ]


async def test_a_slow_handler_keeps_its_message_and_stop_drains(
    nc: Client, topology: Topology, variant_config: Callable[..., Path]
) -> None:
    # ack_wait 1 s and a handler that needs 2.5 s: in_progress() must keep it.
    cfg = variant_config(("ack_wait: 5s", "ack_wait: 1s"))
    short = config.load(cfg)
    await provision(nc, short, cfg.parent)
    started: list[str] = []
    finished: list[str] = []

    async def slow(event: Event, history: History) -> Sequence[Event]:
        started.append(event.order_id)
        await asyncio.sleep(2.5)
        finished.append(event.order_id)
        return []

    stop, task = await _run_worker(nc, short, "delivery", slow)
    await _publish_paid(nc, *(f"o-slow-{i}" for i in range(40)))
    while not started:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    stop.set()  # what SIGTERM does in `runner.py run`
    await task

    # The server applies acks asynchronously; give it a moment, well under
    # ack_wait (1 s), so that an unacked message cannot pass for an acked one.
    for _ in range(10):
        info = await nc.jetstream().consumer_info("ORDERS", "delivery")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert started and sorted(started) == sorted(finished)  # everything in hand was finished
    assert len(set(started)) == len(started)  # and handled once: no redelivery while slow
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0  # all acked on the way out
    assert info.num_pending == 40 - len(started)  # the rest wait, untouched, for the next process


async def _letters(nc: Client, topology: Topology) -> list:  # type: ignore[type-arg]
    from orderflow.tools.dlq import dead_letters

    return await dead_letters(nc, topology)
