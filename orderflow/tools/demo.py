"""``demo``: publish realistic orders, wait for every terminal event, summarise.

Orders are published the way any client would (no special headers), and the
demo listens for ``orders.completed`` / ``orders.cancelled``. Latency is
measured from the publish of ``orders.created`` to the arrival of the
order's terminal event.

How long it waits: an explicit ``timeout`` is a deadline from the start, exactly.
Without one there is no fixed deadline (a run of 40,000 orders needs longer than
one of 1,000, and a slow machine longer than a fast one): the demo waits while
orders keep finishing and gives up only once none has finished for ``stall``
seconds. The progress line shows the recent rate and how long the rest will take.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.events import TERMINAL_SUBJECTS, OrderCreated, OrderItem
from orderflow import subjects
from orderflow.runtime.gateway import DECLINED_TOKEN, FLAKY_TOKEN

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

# Without --timeout, a minute in which no order finished means the flow is stuck:
# streams.yaml's longest waits for one message are a 15 s retry backoff and a 30 s
# saga step timeout, and a crashed function costs an ack_wait (5 s) and a restart.
STALL_S = 60.0


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
        outcome = msg.subject.rsplit(".", 1)[1]
        if order_id in self.finished:
            # The same end announced again is a repeat the log refused (both
            # halves of a join may announce it; a core subscriber sees both).
            # Another end is an order that ended twice.
            self.duplicates += self.finished[order_id][0] != outcome
            return
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


def give_up_at(start: float, timeout: float | None, last_progress: float, stall: float) -> float:
    """When to stop waiting (a monotonic time): ``start + timeout`` exactly when a
    timeout is given; else ``stall`` seconds after the last progress."""
    if timeout is not None:
        return start + timeout
    return last_progress + stall


def recent_rate(samples: Sequence[tuple[float, int]], window: float = 10.0) -> float:
    """Orders finished per second over the last ``window`` seconds of ``(time, finished)``
    samples, oldest first. The recent pace, not the average since the start: filling
    the pipeline at the start would make the rest look slower than it is."""
    now, done = samples[-1]
    then, before = next((t, d) for t, d in samples if t >= now - window)
    return (done - before) / (now - then) if now > then else 0.0


def eta_s(remaining: int, rate: float) -> float | None:
    """Seconds until the ``remaining`` orders are finished at ``rate`` orders/s; None
    while nothing finishes (no rate to go by)."""
    if remaining <= 0:
        return 0.0
    return remaining / rate if rate > 0 else None


def _duration(seconds: float) -> str:
    return f"{max(seconds, 1):.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def progress_line(
    elapsed: float,
    published: int,
    total: int,
    done: Counter[str],
    rate: float,
    idle: float,
    stall: float | None,
) -> str:
    """One line of progress; ``idle`` is how long no order has finished, ``stall`` when
    the demo gives up on that (None: an explicit timeout decides)."""
    finished = done["completed"] + done["cancelled"]
    line = (
        f"  {elapsed:6.1f}s  published {published}/{total}  finished {finished}/{total}"
        f" (completed {done['completed']}, cancelled {done['cancelled']})  {rate:.0f} orders/s"
    )
    eta = eta_s(total - finished, rate)
    if eta is not None and finished < total:
        line += f"  ~{_duration(eta)} left"
    # Said from 10 s on (half the stall period if shorter), so a give-up is no surprise;
    # shorter pauses are ordinary retries.
    if stall is not None and idle >= min(10.0, stall / 2):
        line += f"  nothing finished for {idle:.0f} s (giving up at {stall:.0f} s)"
    return line


async def run_orders(
    nc: Client,
    orders: list[tuple[str, OrderCreated]],
    timeout: float | None = None,
    in_flight: int = 256,
    progress: bool = False,
    stall: float = STALL_S,
) -> dict[str, object]:
    """Publish ``orders``, wait for their terminal events, return the summary.

    Waits ``timeout`` seconds from the start at most; without one, until no order
    has finished for ``stall`` seconds (see the module docstring)."""
    tally = Tally(expected=len(orders))
    async with tally.listening(nc):
        return await _run_orders(nc, tally, orders, timeout, in_flight, progress, stall)


async def _run_orders(
    nc: Client,
    tally: Tally,
    orders: list[tuple[str, OrderCreated]],
    timeout: float | None,
    in_flight: int,
    progress: bool,
    stall: float,
) -> dict[str, object]:
    js = nc.jetstream()
    window = asyncio.Semaphore(in_flight)
    start = time.monotonic()

    async def publish(order: OrderCreated) -> None:
        async with window:
            tally.published[order.order_id] = time.monotonic()
            # A plain publish with the stream's ack for back-pressure; no headers.
            await js.publish("orders.created", payload(order))

    # The stall clock starts once every order is out (publishing is progress too),
    # then at each order that finishes; before that it counts from the start.
    published_at = start

    def last_progress() -> float:
        return max([published_at, *(t for _, t in tally.finished.values())])

    async def report() -> None:
        samples = [(start, 0)]
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            samples.append((now, len(tally.finished)))
            done = Counter(outcome for outcome, _ in tally.finished.values())
            line = progress_line(now - start, len(tally.published), len(orders), done,
                                 recent_rate(samples), now - last_progress(),
                                 None if timeout is not None else stall)  # fmt: skip
            print(line, file=sys.stderr)

    reporter = asyncio.create_task(report()) if progress else None
    await asyncio.gather(*(publish(order) for _, order in orders))
    published_at = time.monotonic()
    gave_up: str | None = None
    while not tally.all_finished.is_set():
        left = give_up_at(start, timeout, last_progress(), stall) - time.monotonic()
        if left <= 0:
            gave_up = (
                f"--timeout {timeout:g} s ran out"
                if timeout is not None
                else f"no order finished for {stall:g} s"
            )
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_finished.wait(), left)
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
        "gave_up": gave_up,
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
        f"unfinished  {summary['unfinished']}"
        + (f"  (gave up: {summary['gave_up']})" if summary.get("gave_up") else ""),
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
