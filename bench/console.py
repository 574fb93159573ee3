"""Benchmark of the console: each page's server time at 1M messages of history, and what an
open live view costs the flow.

Run from the repository root (results in bench/README.md):

    python -m bench.console                 # both parts, about 5 minutes
    python -m bench.console --parts pages --size 100000

* ``pages``: ORDERS grown to ``--size`` messages of valid histories
  (``bench/history.py``, no function running), a console process
  (``runner.py console``) against it, every page asked ``--repeat`` times;
  the server's own time is its ``Server-Timing`` answer (the time to build
  the page, not the network's).
* ``live``: the flow at saturation (``bench/run.py``'s measurement), on a
  fresh server each row, alternately without a console and with one open
  page's live stream (``/live``) read throughout: orders/s and CPU per
  order of each, and the console's own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import history as history_mod
from bench import run as bench_run
from bench.cpu import cpu_seconds
from bench.monitor import MonitoredServer
from orderflow import config as config_mod
from orderflow.config import Topology
from orderflow.ops.provision import provision_at
from orderflow.ops.server import free_port, wait_for_port
from orderflow.runtime.connect import connect
from orderflow.tools.demo import make_orders

ROOT = Path(__file__).resolve().parent.parent


def start_console(url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "runner.py"), "console", "--port", str(port)],
        env={**os.environ, "NATS_URL": url}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port, 20.0)
    return process, f"http://127.0.0.1:{port}"


def server_ms(url: str) -> float:
    """GET ``url``; the console's own time for it (``Server-Timing: app;dur=...``)."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        answer.read()
        timing = answer.headers.get("Server-Timing", "")
    return float(timing.partition("dur=")[2] or "nan")


# --- pages at size -----------------------------------------------------------------


async def _grow(url: str, topology: Topology, store: Path, size: int) -> dict[str, Any]:
    nc = await connect(url, name="bench-console")
    try:
        gen = history_mod.Generator(nc, topology)
        result = await history_mod.measure_size(gen, url, ROOT, store, size, print)
        return {"messages": result.messages, "old": gen.old_unfinished[0],
                "recent": gen.complete[-1][0], "customer": "c-1"}  # fmt: skip
    finally:
        await nc.close()


def pages(topology: Topology, size: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp:
        server = MonitoredServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(provision_at(server.url, topology, ROOT))
            grown = asyncio.run(_grow(server.url, topology, server.store_dir, size))
            console, base = start_console(server.url)
            try:
                time.sleep(2.0)  # its first snapshots
                paths = {
                    "flow": "/",
                    "orders completed": "/orders?status=completed",
                    "orders cancelled": "/orders?status=cancelled",
                    "orders unfinished": "/orders?status=unfinished",
                    "orders by customer": f"/orders?customer={grown['customer']}",
                    "an old order": f"/orders/{grown['old']}",
                    "a recent order": f"/orders/{grown['recent']}",
                    "stuck": "/stuck?older_than=0",
                    "dead letters": "/dead-letters",
                }
                rows = {}
                for name, path in paths.items():
                    took = [server_ms(base + path) for _ in range(repeat)]
                    # The first ask apart: it may find the server's indexes cold.
                    rows[name] = {"first_ms": round(took[0], 1),
                                  "median_ms": round(statistics.median(took[1:]), 1),
                                  "max_ms": round(max(took[1:]), 1), "path": path}  # fmt: skip
            finally:
                console.terminate()
                console.wait(10)
        finally:
            server.stop()
    return {"messages": grown["messages"], "repeat": repeat, "pages": rows}


# --- what a live view costs ----------------------------------------------------------


class LiveReader(threading.Thread):
    """An open flow page: reads the console's event stream until told to stop."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.events, self.stop = url, 0, threading.Event()

    def run(self) -> None:
        with urllib.request.urlopen(self.url + "/live", timeout=60) as stream:
            for line in stream:
                if line.startswith(b"event: flow"):
                    self.events += 1
                if self.stop.is_set():
                    return


def live_row(setup: bench_run.Setup, orders: int, with_console: bool) -> dict[str, Any]:
    load = "saturation + live view" if with_console else "saturation"
    base = dict.fromkeys(setup.topology.functions, 1)
    result = bench_run.FlowResult(load, base, orders)
    mix = make_orders(orders, run_id=f"live-{int(with_console)}-{time.monotonic_ns()}", seed=42)
    console_cpu = 0.0
    events = 0
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp:
        server = MonitoredServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(provision_at(server.url, setup.topology, ROOT))
            config = bench_run.config_file(setup, Path(tmp))
            fleet = bench_run.FlowFleet(server.url, config, base, Path(tmp) / "logs")
            console = reader = None
            try:
                fleet.start()
                if with_console:
                    console, url = start_console(server.url)
                    reader = LiveReader(url)
                    reader.start()
                    time.sleep(1.0)
                    before = cpu_seconds(console.pid)
                warmup = make_orders(setup.warmup, run_id="warmup", seed=7)
                asyncio.run(bench_run.measure_flow(server, setup.topology, fleet, result, mix,
                                                   warmup, None, setup.timeout))  # fmt: skip
                if console is not None and reader is not None:
                    console_cpu = cpu_seconds(console.pid) - before
                    events = reader.events
                    reader.stop.set()
            finally:
                if console is not None:
                    console.terminate()
                    console.wait(10)
                fleet.stop()
        finally:
            server.stop()
    cpu = result.cpu
    return {
        "load": load,
        "orders_per_s": result.orders_per_s,
        "cpu_ms_per_order": round((cpu.server_s + cpu.processes_s) / orders * 1000, 2),
        "console_cpu_s": round(console_cpu, 3),
        "live_events": events,
        "other_pct": cpu.machine_other_pct,
        "ok": not result.failed,
    }


def live(setup: bench_run.Setup, orders: int, pairs: int) -> dict[str, Any]:
    rows = []
    for _ in range(pairs):  # alternated, so both see the same machine
        rows.append(live_row(setup, orders, with_console=False))
        rows.append(live_row(setup, orders, with_console=True))
    plain = [r["orders_per_s"] for r in rows if r["load"] == "saturation"]
    viewed = [r["orders_per_s"] for r in rows if r["load"] != "saturation"]
    cost = 1 - statistics.median(viewed) / statistics.median(plain)
    return {"rows": rows, "cost_pct": round(100 * cost, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--parts", default="pages,live")
    p.add_argument("--size", type=int, default=1_000_000, help="messages of history (pages)")
    p.add_argument("--repeat", type=int, default=20, help="asks of each page")
    p.add_argument("--orders", type=int, default=800, help="orders per live row")
    p.add_argument("--pairs", type=int, default=2, help="rows without and with a live view")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    topology = config_mod.load(ROOT / "streams.yaml")
    out: dict[str, Any] = {"machine": bench_run.machine()}
    if "pages" in args.parts:
        out["pages"] = pages(topology, args.size, args.repeat)
        print(f"pages at {out['pages']['messages']:,} messages (server ms, {args.repeat} asks):")
        for name, row in out["pages"]["pages"].items():
            print(f"  {name:<20} first {row['first_ms']:>7.1f}  then median "
                  f"{row['median_ms']:>7.1f}  max {row['max_ms']:>7.1f}")  # fmt: skip
    if "live" in args.parts:
        setup = bench_run.Setup(topology, False, 40, 180.0, None)
        out["live"] = live(setup, args.orders, args.pairs)
        for row in out["live"]["rows"]:
            print(f"  {row['load']:<24} {row['orders_per_s']:>7.1f} orders/s "
                  f"{row['cpu_ms_per_order']:>6.2f} ms CPU/order  console {row['console_cpu_s']} s "
                  f"({row['live_events']} live events)  other {row['other_pct']} %")  # fmt: skip
        print(f"  an open live view cost {out['live']['cost_pct']} % of orders/s (medians)")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
