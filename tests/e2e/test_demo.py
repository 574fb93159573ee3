"""How long `demo` waits for its orders, and what its progress line says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from orderflow import subjects
from orderflow.cli import parser
from orderflow.tools import demo
from orderflow.tools.demo import eta_s, give_up_at, make_orders, progress_line, recent_rate

ROOT = Path(__file__).resolve().parents[2]


def test_an_explicit_timeout_is_exact() -> None:
    # Progress does not move a deadline the user asked for.
    assert give_up_at(start=100.0, timeout=30.0, last_progress=129.0, stall=60.0) == 130.0


def test_without_a_timeout_the_demo_waits_while_orders_keep_finishing() -> None:
    assert give_up_at(start=100.0, timeout=None, last_progress=100.0, stall=60.0) == 160.0
    assert give_up_at(start=100.0, timeout=None, last_progress=1000.0, stall=60.0) == 1060.0


def test_the_cli_has_no_fixed_deadline_unless_asked() -> None:
    assert parser().parse_args(["demo", "--orders", "40000"]).timeout is None
    assert parser().parse_args(["demo", "--timeout", "5"]).timeout == 5.0


def test_rate_is_the_recent_pace() -> None:
    assert recent_rate([(0.0, 0)]) == 0.0
    # 10 s to fill the pipeline, then 100 orders/s: the last 5 s say 100, not the average.
    samples = [(0.0, 0), (10.0, 0), *((10.0 + s, 100 * s) for s in range(1, 11))]
    assert recent_rate(samples, window=5.0) == 100.0
    assert recent_rate([(0.0, 0), (2.0, 50)], window=5.0) == 25.0  # shorter than the window


def test_eta() -> None:
    assert eta_s(remaining=1200, rate=100.0) == 12.0
    assert eta_s(remaining=0, rate=0.0) == 0.0
    assert eta_s(remaining=10, rate=0.0) is None  # nothing finished yet: unknown


def test_the_progress_line_says_how_long_the_rest_takes() -> None:
    done = Counter(completed=700, cancelled=100)
    line = progress_line(8.0, 2000, 2000, done, rate=100.0, idle=0.0, stall=60.0)
    assert "finished 800/2000" in line and "100 orders/s" in line and "~12 s left" in line
    assert "~3 min left" in progress_line(8.0, 2000, 20000, done, 100.0, 0.0, 60.0)
    waiting = progress_line(8.0, 2000, 2000, Counter(), rate=0.0, idle=0.0, stall=60.0)
    assert "left" not in waiting
    stalled = progress_line(80.0, 2000, 2000, done, rate=0.0, idle=25.0, stall=60.0)
    assert "nothing finished for 25 s (giving up at 60 s)" in stalled


@contextlib.asynccontextmanager
async def finisher(nc: Client, every: float, limit: int) -> AsyncIterator[None]:
    """Stands in for the flow: completes the first ``limit`` orders, one each ``every`` s."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def on_created(msg: Msg) -> None:
        queue.put_nowait(msgspec.json.decode(msg.data)["order_id"])

    async def finish() -> None:
        for _ in range(limit):
            order_id = await queue.get()
            await asyncio.sleep(every)
            done = msgspec.json.encode({"order_id": order_id})
            await nc.publish(subjects.subject("orders.completed", order_id), done)

    sub = await nc.subscribe("orders.created", cb=on_created)
    task = asyncio.create_task(finish())
    try:
        yield
    finally:
        task.cancel()
        await sub.unsubscribe()


async def test_no_deadline_while_orders_keep_finishing(provisioned: Client) -> None:
    orders = make_orders(30, run_id="slow")
    # 30 orders at 10/s take ~3 s, three times the stall period: never a second without one.
    async with finisher(provisioned, every=0.1, limit=30):
        summary = await demo.run_orders(provisioned, orders, timeout=None, stall=1.0)
    assert (summary["completed"], summary["unfinished"], summary["gave_up"]) == (30, 0, None)
    assert summary["elapsed_s"] >= 2.5  # type: ignore[operator]


async def test_without_a_deadline_it_gives_up_when_nothing_finishes(provisioned: Client) -> None:
    orders = make_orders(30, run_id="stall")
    began = time.monotonic()
    async with finisher(provisioned, every=0.05, limit=10):
        summary = await demo.run_orders(provisioned, orders, timeout=None, stall=1.0)
    assert (summary["completed"], summary["unfinished"]) == (10, 20)
    assert summary["gave_up"] == "no order finished for 1 s"
    assert time.monotonic() - began < 5


async def test_an_explicit_timeout_ends_the_wait_even_while_orders_finish(
    provisioned: Client,
) -> None:
    orders = make_orders(30, run_id="deadline")
    began = time.monotonic()
    async with finisher(provisioned, every=0.1, limit=30):
        summary = await demo.run_orders(provisioned, orders, timeout=1.0, stall=60.0)
    assert 0 < summary["unfinished"] < 30  # type: ignore[operator]
    assert summary["gave_up"] == "--timeout 1 s ran out"
    assert time.monotonic() - began < 3


def test_demo_end_to_end_without_a_timeout(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "demo", "--orders", "40", "--json",
         "--data-dir", str(tmp_path)],
        env={k: v for k, v in os.environ.items() if k != "NATS_URL"},
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["orders"], summary["unfinished"], summary["gave_up"]) == (40, 0, None)
    assert summary["completed"] + summary["cancelled"] == 40
