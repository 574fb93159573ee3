"""Bad input gets a clear error and loses nothing: rejected, dead-lettered, redriven after a fix."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from functions.events import OrderRejected
from orderflow.tools.demo import payload
from orderflow.tools.dlq import DeadLetter
from tests.conftest import ROOT, StartFlow
from tests.flowkit import Flow, order, terminal_counts


async def _letters_for(flow: Flow, seq: int, count: int) -> list[DeadLetter]:
    for _ in range(100):
        found = [d for d in await flow.dead_letters() if d.sequence == seq]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} dead letters for seq {seq}")


def _runner(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), *args],
        env={**os.environ, "NATS_URL": url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_invalid_order_is_rejected_with_the_field_path(start_flow: StartFlow) -> None:
    flow = await start_flow()
    bad = (
        b'{"order_id":"o-bad-1","customer_id":"c-7","payment_token":"tok_visa",'
        b'"items":[{"sku":"BOOK-42","quantity":-2,"unit_price_cents":1500}]}'
    )
    ack = await flow.nc.jetstream().publish("orders.created", bad)
    letters = await _letters_for(flow, ack.seq, 2)

    # Every function that reads orders.created refused it, at once, bytes intact.
    by_function = {d.function: d for d in letters}
    assert set(by_function) == {"payment", "stock"}
    for d in by_function.values():
        assert d.subject == "orders.created" and d.stream == "ORDERS"
        assert d.deliveries == 1 and d.data == bad and d.time
        assert "$.items[0].quantity" in d.reason and ">= 1" in d.reason
    # ...and the publisher is told why.
    rejected = [s.event() for s in await flow.events() if s.kind == "orders.rejected"]
    assert rejected == [OrderRejected("o-bad-1", reason=by_function["payment"].reason)]
    # Nothing else happened for it.
    assert not [s for s in await flow.events() if s.kind.startswith(("payments.", "stock."))]


async def test_garbage_is_dead_lettered_without_a_rejection(start_flow: StartFlow) -> None:
    flow = await start_flow()
    ack = await flow.nc.jetstream().publish("orders.created", b"\xff not json {")
    letters = await _letters_for(flow, ack.seq, 2)
    assert all("not valid JSON" in d.reason for d in letters)
    assert not [s for s in await flow.events() if s.kind == "orders.rejected"]


async def test_redrive_after_a_fix(
    start_flow: StartFlow, variant_config: Callable[..., Path]
) -> None:
    # max_payload too small for a big (valid) order: it is dead-lettered...
    small = variant_config(("max_payload: 65536", "max_payload: 300"))
    flow = await start_flow(config_path=small)
    big = order("o-big-1", "tok_visa", BOOK_42=1, MUG_7=1, PEN_3=1, LAMP_9=1, DESK_1=1)
    assert len(payload(big)) > 300
    await flow.publish(big)
    letters = await _letters_for(flow, 1, 2)
    assert all("exceeds max_payload 300" in d.reason for d in letters)

    # ...the fix: the normal limit (re-provisioned, functions restarted)...
    await flow.stop()
    fixed = await start_flow()
    listed = _runner(fixed.server.url, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(msgspec.json.decode(listed.stdout.strip().splitlines()[-1])) == 2
    shown = _runner(fixed.server.url, "dlq", "show", str(letters[0].id))
    assert "exceeds max_payload 300" in shown.stdout and "o-big-1" in shown.stdout

    # ...then redrive: republished once, completed once, the dead letters gone.
    redriven = _runner(fixed.server.url, "dlq", "redrive", "--all")
    assert redriven.returncode == 0, redriven.stderr
    assert redriven.stdout.count("already redriven") == 1, redriven.stdout
    seen = await fixed.wait_finished(["o-big-1"], timeout=30)
    assert terminal_counts(seen, ["o-big-1"]) == {"o-big-1": 1}
    assert "orders.completed" in seen["o-big-1"]
    assert seen["o-big-1"].count("orders.created") == 2  # the original and one redrive
    assert await fixed.dead_letters() == []
    assert "no dead letters" in _runner(fixed.server.url, "dlq", "list").stdout
