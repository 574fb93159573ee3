"""``demo``: publish realistic orders, wait for every terminal event, summarise.

Orders are published the way any client would (no special headers), and the
demo listens for ``orders.completed`` / ``orders.cancelled``. Latency is
measured from the publish of ``orders.created`` to the arrival of the
order's terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.events import TERMINAL_SUBJECTS, OrderCreated, OrderItem
from orderflow import subjects
from orderflow.gateway import DECLINED_TOKEN, FLAKY_TOKEN

CATALOG = {  # sku -> unit price in cents; all well stocked in inventory.yaml
    "BOOK-42": 1500,
    "MUG-7": 899,
    "PEN-3": 249,
    "LAMP-9": 3999,
    "CHAIR-5": 12900,
    "DESK-1": 34900,
    "VINYL-88": 2599,
    "POSTER-12": 1200,
}
SOLD_OUT = "SOLD-OUT-1"

# The mix of paths, by weight: most orders succeed, every failure path shows up.
PATHS = {"happy": 70, "declined": 10, "flaky": 10, "out_of_stock": 7, "both_fail": 3}


def make_order(order_id: str, path: str, rng: random.Random) -> OrderCreated:
    skus = rng.sample(sorted(CATALOG), k=rng.randint(1, 3))
    items = [OrderItem(sku, rng.randint(1, 3), CATALOG[sku]) for sku in skus]
    if path in ("out_of_stock", "both_fail"):
        items.append(OrderItem(SOLD_OUT, 1, 999))
    token = {"declined": DECLINED_TOKEN, "both_fail": DECLINED_TOKEN, "flaky": FLAKY_TOKEN}
    return OrderCreated(
        order_id,
        customer_id=f"c-{rng.randint(1, 5000)}",
        items=items,
        payment_token=token.get(path, rng.choice(["tok_visa", "tok_mastercard"])),
    )


def make_orders(n: int, run_id: str, seed: int = 42) -> list[tuple[str, OrderCreated]]:
    """``n`` orders as (path, order); the same seed gives the same orders."""
    rng = random.Random(seed)
    paths = rng.choices(list(PATHS), weights=list(PATHS.values()), k=n)
    return [(path, make_order(f"{run_id}-{i:06d}", path, rng)) for i, path in enumerate(paths)]


def payload(order: OrderCreated) -> bytes:
    """The JSON a client would publish: the contract's fields, without the ``type`` tag."""
    raw = msgspec.to_builtins(order)
    raw.pop("type", None)
    return msgspec.json.encode(raw)


@dataclass
class Tally:
    expected: int
    published: dict[str, float] = field(default_factory=dict)
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)
    duplicates: int = 0

    all_finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_terminal(self, msg: Msg) -> None:
        order_id = msgspec.json.decode(msg.data).get("order_id", "")
        if order_id not in self.published:
            return  # another run's order
        if order_id in self.finished:
            self.duplicates += 1
            return
        outcome = msg.subject.rsplit(".", 1)[1]
        self.finished[order_id] = (outcome, time.monotonic())
        if len(self.finished) == self.expected:
            self.all_finished.set()

    def latencies_ms(self) -> list[float]:
        """Publish to terminal event, of every finished order."""
        return [(t - self.published[oid]) * 1000 for oid, (_, t) in self.finished.items()]

    @contextlib.asynccontextmanager
    async def listening(self, nc: Client) -> AsyncIterator[Tally]:
        """Counting every terminal event while inside."""
        subs = [
            await nc.subscribe(subjects.subject(kind, "*"), cb=self.on_terminal)
            for kind in sorted(TERMINAL_SUBJECTS)
        ]
        try:
            yield self
        finally:
            for sub in subs:
                await sub.unsubscribe()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run_orders(
    nc: Client,
    orders: list[tuple[str, OrderCreated]],
    timeout: float,
    in_flight: int = 256,
    progress: bool = False,
) -> dict[str, object]:
    """Publish ``orders``, wait for their terminal events (or ``timeout``), return the summary."""
    tally = Tally(expected=len(orders))
    async with tally.listening(nc):
        return await _run_orders(nc, tally, orders, timeout, in_flight, progress)


async def _run_orders(
    nc: Client,
    tally: Tally,
    orders: list[tuple[str, OrderCreated]],
    timeout: float,
    in_flight: int,
    progress: bool,
) -> dict[str, object]:
    js = nc.jetstream()
    window = asyncio.Semaphore(in_flight)
    start = time.monotonic()

    async def publish(order: OrderCreated) -> None:
        async with window:
            tally.published[order.order_id] = time.monotonic()
            # A plain publish with the stream's ack for back-pressure; no headers.
            await js.publish("orders.created", payload(order))

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            done = Counter(outcome for outcome, _ in tally.finished.values())
            elapsed = time.monotonic() - start
            print(
                f"  {elapsed:6.1f}s  published {len(tally.published)}/{len(orders)}"
                f"  completed {done['completed']}  cancelled {done['cancelled']}",
                file=sys.stderr,
            )

    reporter = asyncio.create_task(report()) if progress else None
    await asyncio.gather(*(publish(order) for _, order in orders))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            tally.all_finished.wait(), max(0.0, start + timeout - time.monotonic())
        )
    elapsed = (max((t for _, t in tally.finished.values()), default=time.monotonic())) - start
    if reporter:
        reporter.cancel()

    latencies = tally.latencies_ms()
    outcomes = Counter(outcome for outcome, _ in tally.finished.values())
    by_path: dict[str, Counter[str]] = {}
    for path, order in orders:
        outcome = tally.finished.get(order.order_id, ("unfinished", 0.0))[0]
        by_path.setdefault(path, Counter())[outcome] += 1
    return {
        "orders": len(orders),
        "completed": outcomes["completed"],
        "cancelled": outcomes["cancelled"],
        "unfinished": len(orders) - len(tally.finished),
        "duplicate_terminal_events": tally.duplicates,
        "elapsed_s": round(elapsed, 3),
        "orders_per_s": round(len(tally.finished) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies, default=0.0), 1),
        "by_path": {path: dict(counts) for path, counts in sorted(by_path.items())},
    }


def render(summary: dict[str, object]) -> str:
    lines = [
        f"orders      {summary['orders']}",
        f"completed   {summary['completed']}",
        f"cancelled   {summary['cancelled']}",
        f"unfinished  {summary['unfinished']}",
        f"elapsed     {summary['elapsed_s']} s",
        f"throughput  {summary['orders_per_s']} orders/s",
        f"latency     p50 {summary['p50_ms']} ms   p99 {summary['p99_ms']} ms   "
        f"max {summary['max_ms']} ms  (orders.created -> terminal event)",
        "",
        f"{'path':<14}{'completed':>10}{'cancelled':>10}{'unfinished':>11}",
    ]
    by_path = summary["by_path"]
    assert isinstance(by_path, dict)
    for path, counts in by_path.items():
        lines.append(
            f"{path:<14}{counts.get('completed', 0):>10}{counts.get('cancelled', 0):>10}"
            f"{counts.get('unfinished', 0):>11}"
        )
    return "\n".join(lines)
