"""Benchmark: orderflow's runtime against the same flow written on bare nats-py.

Run from the repository root:

    python -m bench.run                      # the short default run (about a minute)
    python -m bench.run --orders 5000 --rates 100,200,500 --duration 10
    python -m bench.run --json               # one JSON object on stdout
    python -m bench.run --profile            # also: py-spy on the busiest function

Every row of the table is its own configuration, measured on a fresh
nats-server (a temp store dir, file storage) provisioned from
``streams.yaml``, with one OS process per function:

* ``framework``: ``orderflow.supervisor.Supervisor`` starting
  ``runner.py run FUNCTION``, exactly as ``up`` deploys the flow;
* ``bare``: ``bench/bare.py FUNCTION URL CONCURRENCY``, the same NATS work
  without the framework.

Both get the same orders (``orderflow.demo.make_orders``, same seed, same
ids), published as the demo does (a JetStream publish, waiting for the
stream's ack), and the benchmark listens for ``orders.completed`` /
``orders.cancelled``. A warm-up batch runs first and is not measured. The exit
status is non-zero if any order stays unfinished, ends with the wrong outcome
or ends twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import msgspec
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from functions import stock
from functions.events import (
    DeliveryScheduled,
    Event,
    OrderCreated,
    OrderItem,
    PaymentSucceeded,
    StockLine,
    StockReserved,
    subject_of,
)
from functions.state import Write
from functions.stock import Level
from orderflow import config as config_mod
from orderflow.config import BucketSpec, Topology
from orderflow.cpu import CLOCK_TICKS, cpu_model, cpu_seconds, machine_ticks
from orderflow.demo import Tally, make_orders, payload, percentile
from orderflow.kv import KvStore
from orderflow.provision import Report, bucket_config, ensure_stream, provision_at
from orderflow.server import EmbeddedServer, binary, stop_all
from orderflow.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "streams.yaml"
BARE = ROOT / "bench" / "bare.py"
PY_SPY = Path(sys.executable).parent / "py-spy"

#: What each path of the demo's order mix must end as; anything else is a bug.
EXPECTED_OUTCOME = {
    "happy": "completed",
    "flaky": "completed",
    "declined": "cancelled",
    "out_of_stock": "cancelled",
    "both_fail": "cancelled",
}

#: Publishes awaiting their stream ack at once when publishing "as fast as the
#: stream acks": the demo's window, so the two drive the system the same way.
PUBLISH_WINDOW = 256

#: Machine time used by others (percent of all CPUs) above which a row is flagged.
OTHER_CPU_WARNING = 15.0


def say(line: str) -> None:
    """Progress goes to stderr, so that stdout is only the table (or the JSON)."""
    print(line, file=sys.stderr, flush=True)


# --- the machine -------------------------------------------------------------


def machine() -> dict[str, str]:
    model = cpu_model()
    server = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=False)
    return {
        "runtime": runtime_version(),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": server.stdout.strip().removeprefix("nats-server: "),
        "nats_py": metadata.version("nats-py"),
        "msgspec": metadata.version("msgspec"),
    }


def runtime_version() -> str:
    """The commit the framework was measured at, and whether its code had local changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "orderflow", "functions", "streams.yaml")
    return commit + (" + uncommitted changes" if changed else "")


# --- CPU time from /proc --------------------------------------------------------


@dataclass
class CpuSnapshot:
    server: float
    functions: dict[str, float]
    driver: float
    machine: list[int]


def snapshot(server_pid: int, pids: dict[str, list[int]]) -> CpuSnapshot:
    return CpuSnapshot(
        server=cpu_seconds(server_pid),
        functions={name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()},
        driver=cpu_seconds(os.getpid()),
        machine=machine_ticks(),
    )


# --- the two implementations, one OS process per function ------------------------------


class Fleet(Protocol):
    def start(self) -> None: ...

    def pids(self) -> dict[str, list[int]]: ...

    def stop(self) -> None: ...


class FrameworkFleet:
    """``runner.py run FUNCTION`` per replica, started by the project's own Supervisor."""

    def __init__(self, url: str, config: Path, replicas: dict[str, int], log_dir: Path) -> None:
        # No supervisor.watch(): a function that dies must show in the results,
        # not be restarted behind the benchmark's back.
        self.supervisor = Supervisor(url, config, replicas, log_level="WARNING", log_dir=log_dir)
        self.functions = list(replicas)

    def start(self) -> None:
        self.supervisor.start()

    def pids(self) -> dict[str, list[int]]:
        return {name: self.supervisor.pids(name) for name in self.functions}

    def stop(self) -> None:
        self.supervisor.stop()


class BareFleet:
    """``bench/bare.py FUNCTION URL CONCURRENCY`` per replica."""

    def __init__(
        self, url: str, replicas: dict[str, int], topology: Topology, log_dir: Path
    ) -> None:
        self.url = url
        self.replicas = replicas
        self.topology = topology
        self.log_dir = log_dir
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, count in self.replicas.items():
            concurrency = self.topology.functions[name].concurrency
            for replica in range(count):
                with open(self.log_dir / f"{name}#{replica}.log", "ab") as log:
                    process = subprocess.Popen(
                        [sys.executable, str(BARE), name, self.url, str(concurrency)],
                        stdout=log,
                        stderr=log,
                        cwd=ROOT,
                    )
                self.processes.append((name, process))

    def pids(self) -> dict[str, list[int]]:
        alive: dict[str, list[int]] = {name: [] for name in self.replicas}
        for name, process in self.processes:
            if process.poll() is None:
                alive[name].append(process.pid)
        return alive

    def stop(self) -> None:
        stop_all([p for _, p in self.processes])


# --- one measurement ------------------------------------------------------------


@dataclass
class Result:
    impl: str
    load: str  # "saturation" or "<rate>/s"
    replicas: dict[str, int]
    orders: int
    completed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    wrong_outcome: int = 0
    duplicates: int = 0
    functions_died: int = 0
    error: str = ""  # the run could not be measured (functions never ready, warm-up failed...)
    elapsed_s: float = 0.0  # first publish -> last terminal event
    orders_per_s: float = 0.0
    publish_rate: float = 0.0  # what the driver actually offered
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    latency_by_path_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_server_s: float = 0.0
    cpu_functions_s: float = 0.0
    cpu_by_function_s: dict[str, float] = field(default_factory=dict)
    cpu_driver_s: float = 0.0
    # The whole machine over the run (from /proc/stat): was it CPU-bound?
    machine_busy_pct: float = 0.0  # not idle and not waiting for I/O
    machine_iowait_pct: float = 0.0
    machine_steal_pct: float = 0.0  # taken by the hypervisor for other guests
    # Busy machine time not spent by the benchmark's own processes (the kernel's
    # network and disk work, and anything else running): a few percent when the
    # machine is quiet; much more means another program disturbed the run.
    machine_other_pct: float = 0.0
    # Throughput of every repetition (--repeat); the row shows the median one.
    repeats_orders_per_s: list[float] = field(default_factory=list)
    # num_pending + num_ack_pending of each function's consumer, sampled every 0.25 s.
    backlog_mean: dict[str, float] = field(default_factory=dict)
    backlog_max: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        problems = (self.unfinished, self.wrong_outcome, self.duplicates, self.functions_died)
        return any(problems) or bool(self.error)

    def per_1000(self, seconds: float) -> float:
        return seconds / self.orders * 1000 if self.orders else 0.0


async def wait_ready(js: JetStreamContext, replicas: dict[str, int], timeout: float = 30.0) -> None:
    """Until every replica of every function has a pull request waiting on its consumer."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = {}
        for name in replicas:
            with contextlib.suppress(Exception):
                info = await js.consumer_info("ORDERS", name)
                waiting[name] = info.num_waiting or 0
        if all(waiting.get(name, 0) >= count for name, count in replicas.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"functions not fetching after {timeout}s: waiting={waiting}")
        await asyncio.sleep(0.1)


async def sample_backlog(
    js: JetStreamContext, functions: list[str], samples: dict[str, list[int]]
) -> None:
    """Every 0.25 s, how many messages each consumer has not finished (until cancelled)."""
    while True:
        for name in functions:
            with contextlib.suppress(Exception):
                info = await js.consumer_info("ORDERS", name)
                samples[name].append((info.num_pending or 0) + (info.num_ack_pending or 0))
        await asyncio.sleep(0.25)


async def offer(
    nc: Client,
    orders: list[tuple[str, OrderCreated]],
    rate: float | None,
    timeout: float,
    on_start: Callable[[], None] | None = None,
) -> tuple[Tally, float, float]:
    """Publish ``orders`` (at ``rate``/s, or as fast as the stream acks them) and wait for
    their terminal events. Returns the tally, the first publish time and the last one."""
    js = nc.jetstream()
    tally = Tally(expected=len(orders))
    subs = [
        await nc.subscribe(subject, cb=tally.on_terminal)
        for subject in ("orders.completed", "orders.cancelled")
    ]
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    last_publish = 0.0

    async def publish(order: OrderCreated) -> None:
        nonlocal last_publish
        async with window:
            # Latency counts from here: the moment the order is handed to the client.
            tally.published[order.order_id] = last_publish = time.monotonic()
            await js.publish("orders.created", payload(order))

    if on_start is not None:
        on_start()
    start = time.monotonic()
    try:
        if rate is None:
            await asyncio.gather(*(publish(order) for _, order in orders))
        else:
            # Open loop: order i is due at start + i/rate, whether or not the
            # flow keeps up, so an overloaded system shows as growing latency.
            tasks = []
            for i, (_, order) in enumerate(orders):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(publish(order)))
            await asyncio.gather(*tasks)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_finished.wait(), timeout)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return tally, start, last_publish


async def measure(
    url: str,
    fleet: Fleet,
    server_pid: int,
    result: Result,
    orders: list[tuple[str, OrderCreated]],
    warmup: list[tuple[str, OrderCreated]],
    rate: float | None,
    timeout: float,
    on_start: Callable[[dict[str, list[int]]], None] | None = None,
) -> None:
    nc = await nats.connect(url, name="bench-driver")
    try:
        js = nc.jetstream()
        await wait_ready(js, result.replicas)
        # Warm up: every process has connected, bound, imported what it lazily
        # imports and handled each kind of message once before the clock starts.
        tally, _, _ = await offer(nc, warmup, None, timeout)
        if len(tally.finished) < len(warmup):
            raise RuntimeError(f"warm-up: {len(warmup) - len(tally.finished)} orders unfinished")

        pids = fleet.pids()
        samples: dict[str, list[int]] = {name: [] for name in result.replicas}
        sampler = asyncio.create_task(sample_backlog(js, list(result.replicas), samples))
        before = snapshot(server_pid, pids)
        try:
            tally, start, last_publish = await offer(
                nc, orders, rate, timeout, None if on_start is None else lambda: on_start(pids)
            )
        finally:
            after = snapshot(server_pid, pids)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    finally:
        await nc.close()

    outcomes = Counter(outcome for outcome, _ in tally.finished.values())
    result.completed, result.cancelled = outcomes["completed"], outcomes["cancelled"]
    result.unfinished = len(orders) - len(tally.finished)
    result.duplicates = tally.duplicates
    result.wrong_outcome = sum(
        1
        for path, order in orders
        if order.order_id in tally.finished
        and tally.finished[order.order_id][0] != EXPECTED_OUTCOME[path]
    )
    result.functions_died = sum(result.replicas.values()) - sum(map(len, fleet.pids().values()))
    end = max((t for _, t in tally.finished.values()), default=time.monotonic())
    result.elapsed_s = round(end - start, 3)
    result.orders_per_s = round(len(tally.finished) / (end - start), 1) if end > start else 0.0
    if last_publish > start:
        result.publish_rate = round((len(orders) - 1) / (last_publish - start), 1)

    def latencies(ids: list[str]) -> list[float]:
        return [
            (tally.finished[oid][1] - tally.published[oid]) * 1000
            for oid in ids
            if oid in tally.finished
        ]

    overall = latencies([order.order_id for _, order in orders])
    result.p50_ms = round(percentile(overall, 50), 1)
    result.p99_ms = round(percentile(overall, 99), 1)
    result.max_ms = round(max(overall, default=0.0), 1)
    for path in sorted(EXPECTED_OUTCOME):
        these = latencies([order.order_id for p, order in orders if p == path])
        result.latency_by_path_ms[path] = {
            "n": len(these),
            "p50": round(percentile(these, 50), 1),
            "p99": round(percentile(these, 99), 1),
        }

    result.cpu_server_s = round(after.server - before.server, 3)
    result.cpu_by_function_s = {
        name: round(after.functions[name] - before.functions[name], 3) for name in pids
    }
    result.cpu_functions_s = round(sum(result.cpu_by_function_s.values()), 3)
    result.cpu_driver_s = round(after.driver - before.driver, 3)
    ticks = [b - a for a, b in zip(before.machine, after.machine, strict=True)]
    total = sum(ticks) or 1
    idle, iowait, steal = ticks[3], ticks[4], ticks[7]
    result.machine_busy_pct = round(100 * (total - idle - iowait) / total, 1)
    result.machine_iowait_pct = round(100 * iowait / total, 1)
    result.machine_steal_pct = round(100 * steal / total, 1)
    ours = result.cpu_server_s + result.cpu_functions_s + result.cpu_driver_s
    busy_s = (total - idle - iowait) / CLOCK_TICKS
    result.machine_other_pct = round(100 * (busy_s - ours) / (total / CLOCK_TICKS), 1)
    result.backlog_mean = {n: round(sum(s) / len(s), 1) if s else 0.0 for n, s in samples.items()}
    result.backlog_max = {n: max(s, default=0) for n, s in samples.items()}


@dataclass
class Setup:
    """What every run shares: the topology (streams.yaml, maybe with experiment overrides)."""

    topology: Topology
    overridden: bool
    warmup: int
    timeout: float
    repeat: int
    store_root: Path | None  # where the fresh store dirs go (None: the system's temp dir)


def config_file(setup: Setup, tmp: Path) -> Path:
    """streams.yaml, or, with experiment overrides, the changed topology written to ``tmp``."""
    if not setup.overridden:
        return CONFIG
    # The functions read their settings from a file: hand them the changed one.
    config = tmp / "streams.yaml"
    config.write_bytes(msgspec.yaml.encode(setup.topology))
    return config


def run_config(
    setup: Setup,
    impl: str,
    load: str,
    replicas: dict[str, int],
    orders: list[tuple[str, OrderCreated]],
    rate: float | None,
    on_start: Callable[[dict[str, list[int]]], None] | None = None,
) -> Result:
    """One configuration on its own fresh server; every process is stopped on the way out."""
    result = Result(impl, load, replicas, len(orders))
    say(f"  {impl:<9} {label(result):<24} {len(orders)} orders ...")
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-", dir=setup.store_root) as tmp:
        config = config_file(setup, Path(tmp))
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        try:
            assert server.process is not None
            asyncio.run(provision_at(server.url, setup.topology, ROOT))
            log_dir = Path(tmp) / "logs"
            fleet: Fleet = (
                FrameworkFleet(server.url, config, replicas, log_dir)
                if impl == "framework"
                else BareFleet(server.url, replicas, setup.topology, log_dir)
            )
            try:
                fleet.start()
                warmup = make_orders(setup.warmup, run_id="warmup", seed=7)
                asyncio.run(
                    measure(server.url, fleet, server.process.pid, result, orders, warmup,
                            rate, setup.timeout, on_start)
                )  # fmt: skip
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            finally:
                fleet.stop()
                if result.failed:
                    show_logs(log_dir)
        finally:
            server.stop()
    outcome = "ok"
    if result.failed:
        outcome = "FAILED: " + (
            result.error
            or f"{result.unfinished} unfinished, {result.wrong_outcome} wrong outcome, "
            f"{result.duplicates} ended twice, {result.functions_died} processes died"
        )
    say(f"  {'':<9} {'':<24} -> {result.orders_per_s} orders/s, p50 {result.p50_ms} ms, "
        f"p99 {result.p99_ms} ms, {outcome}")  # fmt: skip
    return result


def run_rows(
    setup: Setup,
    impls: list[str],
    load: str,
    replicas: dict[str, int],
    orders: list[tuple[str, OrderCreated]],
    rate: float | None,
) -> list[Result]:
    """One row per implementation: the median of ``setup.repeat`` runs by throughput.

    On a small machine one run's throughput moves by tens of percent (see
    bench/README.md), so a row can be the middle of several; the repetitions
    alternate between the implementations so that drift hits both alike. A
    failed run is the row, whatever its throughput: a failure must show.
    """
    runs: dict[str, list[Result]] = {impl: [] for impl in impls}
    for _ in range(setup.repeat):
        for impl in impls:
            runs[impl].append(run_config(setup, impl, load, replicas, orders, rate))
    rows = []
    for impl in impls:
        failed = [r for r in runs[impl] if r.failed]
        ordered = sorted(runs[impl], key=lambda r: r.orders_per_s)
        row = failed[0] if failed else ordered[len(ordered) // 2]
        row.repeats_orders_per_s = [r.orders_per_s for r in runs[impl]]
        rows.append(row)
    return rows


def show_logs(log_dir: Path, lines: int = 15) -> None:
    for log in sorted(log_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            say(f"--- {log.name} (last {len(tail)} lines)")
            for line in tail:
                say(line)


# --- one function alone: the framework's cost per message ------------------------------

#: What each drainable function reads, per order: events that need nothing else
#: (no gateway, no stock levels), so the function can run alone on a backlog.
DRAIN_INPUTS: dict[str, Callable[[str], list[Event]]] = {
    "delivery": lambda oid: [
        PaymentSucceeded(oid, 1500, charge_id=f"ch_{oid}"),
        StockReserved(oid, items=[StockLine("BOOK-42", 1)]),
    ],
    # order reads only the outcomes that can end an order: for a completed one,
    # delivery.scheduled.
    "order": lambda oid: [DeliveryScheduled(oid, tracking_id=f"TRK-{oid}")],
}
DRAIN_BASELINE_ORDERS = 200


@dataclass
class Drained:
    messages: int
    seconds: float  # from starting the process until the backlog is settled
    function_cpu_s: float  # the function's process, since it started (imports included)
    server_cpu_s: float


async def preload(url: str, function: str, orders: int) -> int:
    nc = await nats.connect(url, name="bench-preload")
    try:
        js = nc.jetstream()
        window = asyncio.Semaphore(PUBLISH_WINDOW)
        events = [e for i in range(orders) for e in DRAIN_INPUTS[function](f"drain-{i:06d}")]

        async def publish(event: Event) -> None:
            async with window:
                await js.publish(subject_of(type(event)), msgspec.json.encode(event))

        await asyncio.gather(*(publish(e) for e in events))
        return len(events)
    finally:
        await nc.close()


async def wait_settled(url: str, durable: str, timeout: float) -> None:
    nc = await nats.connect(url, name="bench-drain")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            info = await js.consumer_info("ORDERS", durable)
            if not info.num_pending and not info.num_ack_pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{durable}: {info.num_pending} messages left after {timeout}s")
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


def drain_once(setup: Setup, impl: str, function: str, orders: int) -> Drained:
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-", dir=setup.store_root) as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        try:
            assert server.process is not None
            asyncio.run(provision_at(server.url, setup.topology, ROOT))
            messages = asyncio.run(preload(server.url, function, orders))
            server_before = cpu_seconds(server.process.pid)
            alone = {function: 1}
            log_dir = Path(tmp) / "logs"
            fleet: Fleet = (
                FrameworkFleet(server.url, config_file(setup, Path(tmp)), alone, log_dir)
                if impl == "framework"
                else BareFleet(server.url, alone, setup.topology, log_dir)
            )
            try:
                started = time.monotonic()
                fleet.start()
                pid = fleet.pids()[function][0]
                asyncio.run(wait_settled(server.url, function, setup.timeout))
                seconds = time.monotonic() - started
                function_cpu = cpu_seconds(pid)
                server_cpu = cpu_seconds(server.process.pid) - server_before
            finally:
                fleet.stop()
        finally:
            server.stop()
    return Drained(messages, seconds, function_cpu, server_cpu)


def drain(setup: Setup, impl: str, function: str, orders: int) -> dict[str, Any]:
    """CPU and time per message of ``function`` alone, settling a backlog of its inputs.

    No other function runs and nothing is published while it works, so this is
    the per-message cost of the implementation itself. A small run first
    measures what starting the process costs (imports, connecting); the figures
    are the difference between the two runs, divided by the extra messages.
    """
    say(f"  {impl:<9} drain {function}: {orders} orders' worth of input ...")
    small = drain_once(setup, impl, function, DRAIN_BASELINE_ORDERS)
    large = drain_once(setup, impl, function, orders)
    extra = large.messages - small.messages
    row = {
        "impl": impl,
        "function": function,
        "messages": large.messages,
        "msgs_per_s": round(extra / max(large.seconds - small.seconds, 1e-9)),
        "function_cpu_us_per_msg": round(
            (large.function_cpu_s - small.function_cpu_s) / extra * 1e6
        ),
        "server_cpu_us_per_msg": round((large.server_cpu_s - small.server_cpu_s) / extra * 1e6),
    }
    say(f"  {'':<9} -> {row['msgs_per_s']} msgs/s, {row['function_cpu_us_per_msg']} us CPU per msg")
    return row


def render_drain(rows: list[dict[str, Any]]) -> str:
    out = [
        "",
        "one function alone, settling a backlog (marginal cost per message)",
        f"{'impl':<10}{'function':<10}{'messages':>9}{'msgs/s':>9}{'fn CPU us':>11}"
        f"{'server CPU us':>15}",
    ]
    for r in rows:
        out.append(
            f"{r['impl']:<10}{r['function']:<10}{r['messages']:>9}{r['msgs_per_s']:>9}"
            f"{r['function_cpu_us_per_msg']:>11}{r['server_cpu_us_per_msg']:>15}"
        )
    return "\n".join(out)


# --- the KV operations themselves -----------------------------------------------------

KV_PROBES = 300  # of each operation


async def probe_kv(url: str, server_pid: int) -> list[dict[str, Any]]:
    """Latency and server CPU of each kind of KV operation, one at a time, through the
    framework's own ``KvStore``, on a bucket in file storage and one in memory storage."""
    nc = await nats.connect(url, name="bench-kv")
    try:
        return [
            *await probe_bucket(nc, "file", server_pid),
            *await probe_bucket(nc, "memory", server_pid),
        ]
    finally:
        await nc.close()


async def probe_bucket(
    nc: Client, storage: Literal["file", "memory"], server_pid: int
) -> list[dict[str, Any]]:
    bucket = f"probe_{storage}"
    await ensure_stream(nc.jetstream(), bucket_config(BucketSpec(bucket, storage)), Report())
    store = KvStore(nc, bucket)
    await store.commit(Write("level.x", Level(1), 0))

    def new_keys(op: str, i: int, n: int) -> list[Write]:
        return [Write(f"{op}.{i}.{k}", Level(i), 0) for k in range(n)]

    # A whole stock reservation through the handler: 2 SKUs (reads, writes, settling).
    for sku in ("A", "B"):
        await store.commit(Write(stock.level_key(sku), Level(10**9), 0))

    def reservation(i: int) -> Awaitable[object]:
        items = [OrderItem("A", 1, 100), OrderItem("B", 1, 100)]
        return stock.handle(OrderCreated(f"probe-{i}", "c-1", items, "tok"), store)

    operations: dict[str, Callable[[int], Awaitable[object]]] = {
        "get": lambda i: store.get("level.x", Level),
        "compare-and-set, 1 key": lambda i: store.commit(*new_keys("one", i, 1)),
        "atomic batch, 2 keys": lambda i: store.commit(*new_keys("two", i, 2)),
        "atomic batch, 4 keys": lambda i: store.commit(*new_keys("four", i, 4)),
        "stock reservation, 2 SKUs": reservation,
    }
    rows = []
    for name, operation in operations.items():
        took = []
        cpu_before = cpu_seconds(server_pid)
        for i in range(KV_PROBES):
            started = time.perf_counter()
            await operation(i)
            took.append((time.perf_counter() - started) * 1000)
        server_cpu = cpu_seconds(server_pid) - cpu_before
        rows.append({
            "storage": storage,
            "operation": name,
            "p50_ms": round(percentile(took, 50), 2),
            "p90_ms": round(percentile(took, 90), 2),
            "server_cpu_ms": round(server_cpu / KV_PROBES * 1000, 2),
        })  # fmt: skip
    return rows


def kv_run(setup: Setup) -> list[dict[str, Any]]:
    say("  kv operations, one at a time ...")
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-", dir=setup.store_root) as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        try:
            assert server.process is not None
            return asyncio.run(probe_kv(server.url, server.process.pid))
        finally:
            server.stop()


def render_kv(rows: list[dict[str, Any]]) -> str:
    out = [
        "",
        f"KV operations through orderflow.kv.KvStore, one at a time ({KV_PROBES} of each)",
        f"{'storage':<9}{'operation':<27}{'p50 ms':>8}{'p90 ms':>8}{'server CPU ms/op':>18}",
    ]
    for r in rows:
        out.append(
            f"{r['storage']:<9}{r['operation']:<27}{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}"
            f"{r['server_cpu_ms']:>18.2f}"
        )
    return "\n".join(out)


# --- profiling -----------------------------------------------------------------


def profile_run(
    setup: Setup,
    impl: str,
    function: str,
    orders: list[tuple[str, OrderCreated]],
    seconds: int,
    out: Path,
) -> dict[str, Any]:
    """A saturation run with py-spy recording ``function``'s process while the orders flow."""
    spies: list[subprocess.Popen[bytes]] = []

    def attach(pids: dict[str, list[int]]) -> None:
        # py-spy pauses the process for every sample (100 a second), so this
        # run is slower than the measured ones and stays out of the table.
        command = [str(PY_SPY), "record", "-d", str(seconds), "-r", "100",
                   "-p", str(pids[function][0]), "-f", "raw", "-o", str(out)]  # fmt: skip
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(0.3)  # let it attach before the first order goes out

    base = dict.fromkeys(setup.topology.functions, 1)
    try:
        result = run_config(setup, impl, "saturation", base, orders, None, attach)
    finally:
        for spy in spies:
            try:
                spy.wait(seconds + 10)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    errors = b"".join(spy.stderr.read() for spy in spies if spy.stderr).decode(errors="replace")
    summary = summarise_profile(out) if out.exists() and out.stat().st_size else {}
    return {"impl": impl, "function": function, "seconds": seconds, "raw": str(out),
            "run": asdict(result), "py_spy_stderr": errors.strip()[-500:], **summary}  # fmt: skip


def _frame_name(frame: str) -> str:
    """'handle (functions/stock.py:120)' -> 'handle (functions/stock.py)': merge lines."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})"


#: Leaf frames that are a system call on the socket: time in the kernel, not in Python.
_SOCKET_CALLS = (
    "_SelectorSocketTransport.write ",  # send() on the connection to nats-server
    "_SelectorSocketTransport._read_ready__data_received ",  # recv()
    "EpollSelector.select ",  # epoll_wait() with events ready
)


def _area(frame: str) -> str:
    """Which layer a leaf frame belongs to, for a coarse 'where does the time go'."""
    if frame.startswith(_SOCKET_CALLS):
        return "socket syscalls (send, recv, epoll)"
    for area in ("nats/", "msgspec", "orderflow/", "functions/", "bare.py", "asyncio/", "logging/"):
        if area in frame:
            return area.rstrip("/")
    return "other (stdlib, interpreter)"


def _ours(frame: str) -> bool:
    return any(part in frame for part in ("(orderflow/", "(functions/", "(bare.py"))


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's raw (collapsed stack) output.

    py-spy leaves out idle samples (a thread blocked waiting), so the shares
    are of the time the process was running: Python, or a system call.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [_frame_name(f) for f in stack.split(";") if " (" in f]
        if not frames or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        areas[_area(frames[-1])] += count
        for frame in set(frames):
            if _ours(frame):
                inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        # The trunk every sample shares (main, cmd_run) says nothing: leave it out.
        rows = [(name, n) for name, n in counter.most_common() if n < 0.99 * total]
        return [(name, round(100 * n / total, 1)) for name, n in rows[:top]]

    return {"samples": total, "self_by_area_pct": share(areas), "self_pct": share(own),
            "inclusive_ours_pct": share(inclusive)}  # fmt: skip


def render_profile(profile: dict[str, Any]) -> str:
    busy = profile.get("samples", 0) / (100 * profile["seconds"]) * 100
    out = [
        "",
        f"py-spy on {profile['impl']} {profile['function']} during a saturation run: "
        f"{profile.get('samples', 0)} non-idle samples in {profile['seconds']} s at 100 Hz "
        f"(busy {busy:.0f}% of the time); raw stacks: {profile['raw']}",
    ]
    if profile.get("py_spy_stderr"):
        out.append(f"  py-spy said: {profile['py_spy_stderr']}")
    for title, key in (("self time by layer", "self_by_area_pct"),
                       ("self time by function", "self_pct"),
                       ("inclusive time, project code only", "inclusive_ours_pct")):  # fmt: skip
        out.append(f"  {title}:")
        out += [f"    {pct:5.1f}%  {name}" for name, pct in profile.get(key, [])]
    return "\n".join(out)


# --- the report ------------------------------------------------------------------


def label(result: Result) -> str:
    extra = [f"{n} x{c}" for n, c in result.replicas.items() if c > 1]
    return result.load + (f", {', '.join(extra)}" if extra else "")


def render_header(info: dict[str, str], settings: dict[str, Any]) -> str:
    rates = ", ".join(f"{r:g}" for r in settings["rates"])
    out = [
        f"machine   {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, Python "
        f"{info['python']}, nats-server {info['nats_server']}, nats-py {info['nats_py']}",
        f"runtime   orderflow at {info['runtime']}",
        f"settings  saturation: {settings['orders']} orders, at most {PUBLISH_WINDOW} publishes "
        f"awaiting their ack; fixed rates: {rates} orders/s for {settings['duration']:g} s each; "
        f"{settings['warmup']} warm-up orders; a fresh nats-server per row"
        + (f"; median of {settings['repeat']} runs per row" if settings["repeat"] > 1 else ""),
    ]
    if settings["overrides"]:
        out.append(f"overrides {'; '.join(settings['overrides'])} (an experiment, both impls)")
    return "\n".join(out)


def render(results: list[Result], ratios: dict[str, float], busiest: dict[str, str]) -> str:
    repeated = len(results[0].repeats_orders_per_s) > 1
    out = [""]
    spread = f"{'min-max':>12}" if repeated else ""
    out += [
        f"{'impl':<10}{'load':<22}{'orders':>7}{'orders/s':>10}{spread}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'server CPU':>12}{'fn CPU':>9}{'machine':>9}  ok",
        f"{'':<10}{'':<22}{'':>7}{'':>10}{' ' * len(spread)}{'':>9}{'':>9}{'':>9}"
        f"{'s/1k ord':>12}{'s/1k':>9}{'busy %':>9}",
    ]
    for r in results:
        if repeated:
            low, high = min(r.repeats_orders_per_s), max(r.repeats_orders_per_s)
            spread = f"{f'{low:.0f}-{high:.0f}':>12}"
        out.append(
            f"{r.impl:<10}{label(r):<22}{r.orders:>7}{r.orders_per_s:>10.1f}{spread}"
            f"{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.max_ms:>9.1f}{r.per_1000(r.cpu_server_s):>12.2f}"
            f"{r.per_1000(r.cpu_functions_s):>9.2f}{r.machine_busy_pct:>9.0f}"
            f"  {'FAIL' if r.failed else 'ok'}"
        )
    if ratios:
        out += ["", "framework / bare"]
        out += [f"  {name:<46}{value:>7.2f}" for name, value in ratios.items()]
    names = list(results[0].replicas)
    out += [
        "",
        "CPU s per 1000 orders of each function (all replicas) | mean consumer backlog, msgs",
        f"{'impl':<10}{'load':<22}" + "".join(f"{n:>9}" for n in names) + "  |"
        + "".join(f"{n:>9}" for n in names),
    ]  # fmt: skip
    for r in results:
        out.append(
            f"{r.impl:<10}{label(r):<22}"
            + "".join(f"{r.per_1000(r.cpu_by_function_s.get(n, 0.0)):>9.2f}" for n in names)
            + "  |"
            + "".join(f"{r.backlog_mean.get(n, 0.0):>9.0f}" for n in names)
        )
    if busiest:
        out += ["", f"busiest function: {busiest['function']} ({busiest['why']})"]
    disturbed = [f"{r.impl} {label(r)} ({r.machine_other_pct:.0f}%)" for r in results
                 if r.machine_other_pct > OTHER_CPU_WARNING]  # fmt: skip
    if disturbed:
        out.append(f"warning: other programs used the machine during: {', '.join(disturbed)}")
    return "\n".join(out)


def pick_busiest(result: Result) -> tuple[str, str]:
    """The function whose consumer had the most unfinished messages on average.

    At saturation every consumer gets the whole burst at once; the one whose
    backlog stays large longest is the one the flow waits for. (The function
    using the most CPU need not be it: a function can wait on the server.)
    """
    name = max(result.backlog_mean, key=lambda n: result.backlog_mean[n])
    cpu = max(result.cpu_by_function_s, key=lambda n: result.cpu_by_function_s[n])
    return name, (
        f"largest mean consumer backlog at framework saturation, {result.backlog_mean[name]:.0f} "
        f"msgs; most CPU: {cpu}, {result.per_1000(result.cpu_by_function_s[cpu]):.2f} s/1k orders"
    )


def ratios_of(results: list[Result], rates: list[float], busiest: str) -> dict[str, float]:
    def pair(load: str, scaled: bool) -> tuple[Result, Result] | None:
        found = {
            r.impl: r
            for r in results
            if r.load == load and (max(r.replicas.values()) > 1) == scaled and not r.failed
        }
        return (found["framework"], found["bare"]) if len(found) == 2 else None

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    ratios: dict[str, float] = {}
    if base := pair("saturation", False):
        fw, bare = base
        ratios["throughput at saturation"] = ratio(fw.orders_per_s, bare.orders_per_s)
        ratios["server CPU per order at saturation"] = ratio(fw.cpu_server_s, bare.cpu_server_s)
        ratios["function CPU per order at saturation"] = ratio(
            fw.cpu_functions_s, bare.cpu_functions_s
        )
    for rate in rates:
        if at_rate := pair(f"{rate:g}/s", False):
            fw, bare = at_rate
            ratios[f"p50 latency at {rate:g}/s"] = ratio(fw.p50_ms, bare.p50_ms)
            ratios[f"p99 latency at {rate:g}/s"] = ratio(fw.p99_ms, bare.p99_ms)
    if scaled := pair("saturation", True):
        fw2, bare2 = scaled
        ratios[f"throughput at saturation, {busiest} x2+"] = ratio(
            fw2.orders_per_s, bare2.orders_per_s
        )
        if base:
            ratios[f"framework gain from more {busiest}"] = ratio(
                fw2.orders_per_s, base[0].orders_per_s
            )
            ratios[f"bare gain from more {busiest}"] = ratio(
                bare2.orders_per_s, base[1].orders_per_s
            )
    return {name: round(value, 3) for name, value in ratios.items()}


# --- the command line ------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = p.add_argument
    add("--orders", type=int, default=800, help="orders per saturation run (default 800)")
    add("--rates", default="100,500", help="fixed offered rates, orders/s (default 100,500)")
    add("--duration", type=float, default=1.5, help="seconds each rate is offered (default 1.5)")
    add("--warmup", type=int, default=40, help="unmeasured orders before each run")
    add("--replicas", type=int, default=2, help="replicas of the busiest function (default 2)")
    add("--busiest", help="the function to replicate (default: found at saturation)")
    add("--runs", default="saturation,rates,replicas",
        help="which runs: saturation, rates, replicas (the default); drain, kv")  # fmt: skip
    add("--drain-functions", default="delivery,order", help="functions for the drain runs")
    add("--drain-orders", type=int, default=3000, help="orders' worth of input per drain run")
    add("--impls", default="framework,bare", help="which implementations (default both)")
    add("--repeat", type=int, default=1, help="runs per row; the row shows the median")
    add("--seed", type=int, default=42, help="seed of the order mix")
    add("--timeout", type=float, default=180.0, help="seconds to wait for a run's last order")
    add("--json", action="store_true", help="print one JSON object instead of the tables")
    add("--profile", action="store_true",
        help="after the runs, py-spy the busiest function during a saturation run")  # fmt: skip
    add("--profile-function", help="profile this function instead of the busiest")
    add("--profile-impl", default="framework", choices=["framework", "bare"])
    add("--profile-seconds", type=int, default=8, help="how long py-spy records (default 8)")
    add("--profile-orders", type=int, default=2000,
        help="orders in the profiled run (default 2000: busy while py-spy records)")  # fmt: skip
    add("--profile-out", type=Path, help="py-spy's raw output (default: a temp file)")
    add("--concurrency", action="append", default=[], metavar="FUNCTION=N",
        help="experiment: override a function's concurrency from streams.yaml")  # fmt: skip
    add("--memory-bucket", action="append", default=[], metavar="BUCKET",
        help="experiment: keep this KV bucket in memory storage instead of file")  # fmt: skip
    add("--store-root", type=Path, metavar="DIR",
        help="experiment: temp store dirs go here (/dev/shm: fsync costs nothing)")  # fmt: skip
    return p.parse_args(argv)


def apply_overrides(
    topology: Topology, concurrency: list[str], memory_buckets: list[str]
) -> tuple[Topology, list[str]]:
    functions = dict(topology.functions)
    said = []
    for item in concurrency:
        name, _, count = item.partition("=")
        if name not in functions or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--concurrency {item!r}: expected FUNCTION=N, FUNCTION in "
                             f"{', '.join(functions)}")  # fmt: skip
        functions[name] = msgspec.structs.replace(functions[name], concurrency=int(count))
        said.append(f"{name} concurrency {count}")
    known = {b.name for b in topology.buckets}
    for name in memory_buckets:
        if name not in known:
            raise SystemExit(f"--memory-bucket {name!r}: buckets are {', '.join(sorted(known))}")
        said.append(f"bucket {name} in memory storage")
    buckets = [
        msgspec.structs.replace(b, storage="memory") if b.name in memory_buckets else b
        for b in topology.buckets
    ]
    return msgspec.structs.replace(topology, functions=functions, buckets=buckets), said


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    drained_functions = [f.strip() for f in args.drain_functions.split(",") if f.strip()]
    if (
        not runs <= {"saturation", "rates", "replicas", "drain", "kv"}
        or not set(impls) <= {"framework", "bare"}
        or not set(drained_functions) <= set(DRAIN_INPUTS)
    ):
        raise SystemExit("--runs takes saturation, rates, replicas, drain, kv; --impls framework, "
                         f"bare; --drain-functions {', '.join(DRAIN_INPUTS)}")  # fmt: skip

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: processes get stopped

    signal.signal(signal.SIGTERM, terminate)
    topology, overrides = apply_overrides(
        config_mod.load(CONFIG), args.concurrency, args.memory_bucket
    )
    setup = Setup(
        topology, bool(overrides), args.warmup, args.timeout, args.repeat, args.store_root
    )
    base = dict.fromkeys(topology.functions, 1)
    info = machine()
    settings = {"orders": args.orders, "rates": rates, "duration": args.duration,
                "warmup": args.warmup, "seed": args.seed, "repeat": args.repeat,
                "overrides": overrides}  # fmt: skip
    if args.store_root:
        overrides.append(f"stores under {args.store_root}")
    if not args.json:
        say(f"machine: {json.dumps(info)}")
    # The same orders, ids included, go through every configuration.
    orders = make_orders(args.orders, run_id="bench", seed=args.seed)

    results: list[Result] = []
    if "saturation" in runs:
        results += run_rows(setup, impls, "saturation", base, orders, None)
    if "rates" in runs:
        for rate in rates:
            offered = make_orders(max(1, round(rate * args.duration)), "bench", args.seed)
            results += run_rows(setup, impls, f"{rate:g}/s", base, offered, rate)

    busiest_info: dict[str, str] = {}
    measured = [r for r in results if r.load == "saturation" and not r.failed]
    if args.busiest:
        busiest_info = {"function": args.busiest, "why": "chosen with --busiest"}
    elif measured:
        name, why = pick_busiest(measured[0])
        busiest_info = {"function": name, "why": why}
    if "replicas" in runs:
        if not busiest_info:
            raise SystemExit("replicas: no saturation run to find the busiest function; "
                             "give --busiest FUNCTION")  # fmt: skip
        scaled = {**base, busiest_info["function"]: args.replicas}
        results += run_rows(setup, impls, "saturation", scaled, orders, None)

    kv = kv_run(setup) if "kv" in runs else []
    drained = []
    if "drain" in runs:
        for function in drained_functions:
            for impl in impls:
                drained.append(drain(setup, impl, function, args.drain_orders))

    profile = None
    if args.profile:
        target = args.profile_function or busiest_info.get("function")
        if target not in topology.functions:
            known = ", ".join(topology.functions)
            raise SystemExit(f"--profile: give --profile-function ({known}) or run saturation")
        out = args.profile_out or Path(tempfile.gettempdir()) / f"pyspy-{target}.txt"
        say(f"profiling {args.profile_impl} {target} with py-spy -> {out}")
        profiled = make_orders(args.profile_orders, run_id="bench", seed=args.seed)
        profile = profile_run(setup, args.profile_impl, target, profiled, args.profile_seconds, out)

    ratios = ratios_of(results, rates, busiest_info.get("function", "?"))
    if args.json:
        print(json.dumps({"machine": info, "settings": settings,
                          "results": [asdict(r) for r in results],
                          "ratios_framework_over_bare": ratios, "busiest": busiest_info,
                          "drain": drained, "kv": kv, "profile": profile}))  # fmt: skip
    else:
        print(render_header(info, settings))
        if results:
            print(render(results, ratios, busiest_info))
        if drained:
            print(render_drain(drained))
        if kv:
            print(render_kv(kv))
        if profile is not None:
            print(render_profile(profile))
    failed = [f"{r.impl} {label(r)}" for r in results if r.failed]
    if failed:
        say(f"FAILED (unfinished, wrong or doubled outcomes, a dead process): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
