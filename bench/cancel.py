"""Benchmark of a cancellation: how "at once" the answer is, and how long the order then takes
to end.

Run from the repository root (results in bench/README.md):

    python -m bench.cancel                  # about half a minute
    python -m bench.cancel --orders 400

On a fresh nats-server, every function as its own process (``runner.py run``):

* ``too late``: ``--orders`` orders are placed and completed, then each is
  asked to cancel, one request at a time: the answer's round trip (the
  cancel function reads the order's delivery decision and answers);
* ``accepted``: as many orders held paid and reserved (delivery paused), then
  each asked, one at a time: the round trip of an answer that stores
  ``delivery.cancelled`` first; then how long from the answer until the
  order's ``orders.cancelled`` is stored (refund, release, the end), all of
  them in flight together once delivery resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import run as bench_run
from bench.monitor import MonitoredServer
from functions.events import CancelRequest, OrderCreated, OrderItem
from orderflow import config as config_mod
from orderflow import subjects
from orderflow.ops import interventions
from orderflow.ops.provision import provision_at
from orderflow.runtime.connect import connect
from orderflow.tools.demo import payload

ROOT = Path(__file__).resolve().parent.parent


def order(order_id: str) -> OrderCreated:
    return OrderCreated(order_id, "c-bench", [OrderItem("BOOK-42", 1, 1500)], "tok_visa")


def _quantiles(ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(ms, n=100)
    return {"p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2), "n": len(ms)}


async def _ended(nc: Any, order_ids: list[str], kind: str, timeout: float) -> dict[str, float]:
    """When each order's ``kind`` is stored (the stream's own time), waiting up to ``timeout``."""
    js = nc.jetstream()
    found: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(order_ids) and time.monotonic() < deadline:
        for order_id in order_ids:
            if order_id in found:
                continue
            try:
                msg = await js.get_last_msg("ORDERS", subjects.subject(kind, order_id))
            except Exception:
                continue
            assert msg.time is not None
            found[order_id] = msg.time.timestamp()
        await asyncio.sleep(0.1)
    return found


async def _measure(url: str, topology: config_mod.Topology, orders: int) -> dict[str, Any]:
    nc = await connect(url, name="bench-cancel")
    js = nc.jetstream()
    try:

        async def ask(order_id: str) -> tuple[float, str, float]:
            request = CancelRequest(order_id, reason="bench", requested_by="bench")
            started = time.perf_counter()
            answer = await interventions.cancel(nc, topology, request, attempts=20, timeout=2.0)
            return (time.perf_counter() - started) * 1000, answer.answer, time.time()

        # Until the cancel function answers at all.
        await ask("bench-warm-up")
        done = [f"bc-done-{i}" for i in range(orders)]
        for o in done:
            await js.publish(subjects.INGRESS, payload(order(o)))
        completed = await _ended(nc, done, "orders.completed", 120)
        late = [await ask(o) for o in done if o in completed]
        assert all(verdict == "too late" for _, verdict, _ in late), late[:3]

        now = datetime.now(UTC)
        await interventions.pause(nc, topology, "delivery", None, "bench", now, "bench")
        held = [f"bc-held-{i}" for i in range(orders)]
        for o in held:
            await js.publish(subjects.INGRESS, payload(order(o)))
        await _ended(nc, held, "stock.reserved", 120)
        await _ended(nc, held, "payments.succeeded", 120)
        accepted = {o: await ask(o) for o in held}
        assert all(verdict == "accepted" for _, verdict, _ in accepted.values())
        await interventions.resume(nc, topology, "delivery", "bench", datetime.now(UTC), "bench")
        ends = await _ended(nc, held, "orders.cancelled", 120)
        to_end = [(ends[o] - accepted[o][2]) * 1000 for o in held if o in ends]
        return {
            "orders": orders,
            "too_late": _quantiles([ms for ms, _, _ in late]),
            "accepted": _quantiles([ms for ms, _, _ in accepted.values()]),
            "answer_to_cancelled": _quantiles(to_end),
            "ended": len(ends),
        }
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cancel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--orders", type=int, default=200)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    topology = config_mod.load(ROOT / "streams.yaml")
    out: dict[str, Any] = {"machine": bench_run.machine()}
    base = dict.fromkeys(topology.functions, 1)
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp:
        server = MonitoredServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(provision_at(server.url, topology, ROOT))
            fleet = bench_run.FlowFleet(server.url, bench_run.CONFIG, base, Path(tmp) / "logs")
            fleet.start()
            try:
                out |= asyncio.run(_measure(server.url, topology, args.orders))
            finally:
                fleet.stop()
        finally:
            server.stop()
    for name in ("too_late", "accepted", "answer_to_cancelled"):
        row = out[name]
        print(f"  {name:<22} p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  "
              f"({row['n']} orders)")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
