"""Benchmark: the order flow as deployed, next to a plain nats-py reference; trace at size.

Run from the repository root:

    python -m bench.run                      # chain, saturation, 100/s: about a minute
    python -m bench.run --runs chain,saturation,rates,history   # + trace/stuck at 10k-1M
    python -m bench.run --json               # one JSON object on stdout
    python -m bench.run --profile            # also: py-spy on the busiest function

Every row is measured on its own fresh nats-server (a temp store dir, file
storage, loopback only, its HTTP monitoring on a loopback port):

* ``chain``: the reference, ``bench/chain.py`` (plain nats-py, no orderflow):
  3 processes forwarding one message along 4 JetStream hops with one KV
  join, 512 messages in flight; messages through per second;
* ``saturation``: the flow, provisioned from ``streams.yaml``, one OS
  process per function (``orderflow.ops.supervisor.Supervisor``, as ``up``
  deploys it), N orders of the demo mix (``orderflow.tools.demo.make_orders``)
  published as fast as the stream acks them; orders per second and what one
  order costs: CPU of the server and of the functions, messages into and out
  of the server (``/varz``), KV appends;
* ``rates``: the same flow offered R orders/s (open loop): latency, the happy
  path's in particular;
* ``replicas``: saturation again with 2 processes of the busiest function;
* ``traced``: saturation again with tracing on (every function exporting its
  spans over OTLP/HTTP to a receiver in this process, ``bench/otlp.py``), next
  to the plain row: what tracing costs; and what its hooks cost when it is off;
* ``history``: ORDERS filled with valid histories to 10k, 100k, 1M messages
  (``bench/history.py``), then ``trace`` and ``stuck`` timed at each size;
* ``drain``, ``kv``: one function alone on a backlog; single KV operations.

The exit status is non-zero if any order stays unfinished, ends with the
wrong outcome or with two terminal events in the log, if a process died, or
if a run could not be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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

from bench import chain
from bench import history as history_mod
from bench.cpu import CLOCK_TICKS, cpu_model, cpu_seconds, machine_ticks
from bench.monitor import MonitoredServer, Traffic
from functions import stock
from functions.events import (
    TERMINAL_SUBJECTS,
    OrderCreated,
    OrderItem,
)
from functions.state import Write
from functions.stock import Level
from orderflow import config as config_mod
from orderflow import subjects
from orderflow.config import BucketSpec, ConsumerSpec, Topology
from orderflow.ops.provision import bucket_config, ensure_stream, provision_at
from orderflow.ops.server import EmbeddedServer, binary, stop_all
from orderflow.ops.supervisor import Supervisor
from orderflow.runtime.consumers import Report
from orderflow.runtime.kv import KvStore, stream_name
from orderflow.runtime.tracing import OFF
from orderflow.tools.demo import Tally, make_orders, payload, percentile

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "streams.yaml"
CHAIN = ROOT / "bench" / "chain.py"
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

#: The driver's connection name; its own messages (publishing, polling) are told apart.
DRIVER = "bench-driver"


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
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def runtime_version() -> str:
    """The commit the flow was measured at, and whether its code had local changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "orderflow", "functions", "streams.yaml", "bench")
    return commit + (" + uncommitted changes" if changed else "")


# --- CPU time from /proc --------------------------------------------------------


@dataclass
class CpuSnapshot:
    server: float
    processes: dict[str, float]
    driver: float
    machine: list[int]


def snapshot(server_pid: int, pids: dict[str, list[int]]) -> CpuSnapshot:
    return CpuSnapshot(
        server=cpu_seconds(server_pid),
        processes={name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()},
        driver=cpu_seconds(os.getpid()),
        machine=machine_ticks(),
    )


@dataclass
class Usage:
    """CPU used between two snapshots, and how busy the whole machine was meanwhile."""

    server_s: float = 0.0
    processes_s: float = 0.0  # the functions' (or the chain stages') processes, summed
    by_process_s: dict[str, float] = field(default_factory=dict)
    driver_s: float = 0.0
    machine_busy_pct: float = 0.0  # not idle and not waiting for I/O
    machine_iowait_pct: float = 0.0
    machine_steal_pct: float = 0.0  # taken by the hypervisor for other guests
    # Busy machine time not spent by the benchmark's own processes (the kernel's
    # network and disk work, and anything else running): a few percent when the
    # machine is quiet; much more means another program disturbed the run.
    machine_other_pct: float = 0.0


def usage(before: CpuSnapshot, after: CpuSnapshot) -> Usage:
    by_process = {n: round(after.processes[n] - before.processes[n], 3) for n in before.processes}
    ticks = [b - a for a, b in zip(before.machine, after.machine, strict=True)]
    total = sum(ticks) or 1
    idle, iowait, steal = ticks[3], ticks[4], ticks[7]
    used = Usage(
        server_s=round(after.server - before.server, 3),
        processes_s=round(sum(by_process.values()), 3),
        by_process_s=by_process,
        driver_s=round(after.driver - before.driver, 3),
        machine_busy_pct=round(100 * (total - idle - iowait) / total, 1),
        machine_iowait_pct=round(100 * iowait / total, 1),
        machine_steal_pct=round(100 * steal / total, 1),
    )
    ours = used.server_s + used.processes_s + used.driver_s
    busy_s = (total - idle - iowait) / CLOCK_TICKS
    used.machine_other_pct = round(100 * (busy_s - ours) / (total / CLOCK_TICKS), 1)
    return used


# --- the processes, one OS process per function or stage --------------------------


class Fleet(Protocol):
    def start(self) -> None: ...

    def pids(self) -> dict[str, list[int]]: ...

    def stop(self) -> None: ...


class FlowFleet:
    """``runner.py run FUNCTION`` per replica, started by the project's own Supervisor."""

    def __init__(
        self,
        url: str,
        config: Path,
        replicas: dict[str, int],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        # No supervisor.watch(): a function that dies must show in the results,
        # not be restarted behind the benchmark's back.
        self.supervisor = Supervisor(
            url, config, replicas, log_level="WARNING", log_dir=log_dir, env=env
        )
        self.functions = list(replicas)

    def start(self) -> None:
        self.supervisor.start()

    def pids(self) -> dict[str, list[int]]:
        return {name: self.supervisor.pids(name) for name in self.functions}

    def stop(self) -> None:
        self.supervisor.stop()


class ChainFleet:
    """``bench/chain.py stage NAME URL`` for each stage of the reference chain."""

    def __init__(self, url: str, log_dir: Path, workers: int, batch: int) -> None:
        self.url = url
        self.log_dir = log_dir
        self.workers = workers
        self.batch = batch
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in chain.STAGES:
            with open(self.log_dir / f"chain-{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, str(CHAIN), "stage", name, self.url,
                     "--workers", str(self.workers), "--batch", str(self.batch)],
                    stdout=log, stderr=log, cwd=ROOT,
                )  # fmt: skip

    def pids(self) -> dict[str, list[int]]:
        return {n: [p.pid] if p.poll() is None else [] for n, p in self.processes.items()}

    def stop(self) -> None:
        stop_all(list(self.processes.values()))


def show_logs(log_dir: Path, lines: int = 15) -> None:
    for log in sorted(log_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            say(f"--- {log.name} (last {len(tail)} lines)")
            for line in tail:
                say(line)


# --- waiting on consumers -----------------------------------------------------------


async def wait_ready(
    js: JetStreamContext, consumers: dict[tuple[str, str], int], timeout: float = 30.0
) -> None:
    """Until every (stream, durable) has at least as many pull requests waiting as given."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = {}
        for stream, durable in consumers:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(stream, durable)
                waiting[durable] = info.num_waiting or 0
        if all(waiting.get(d, 0) >= n for (_, d), n in consumers.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumers not fetching after {timeout}s: waiting={waiting}")
        await asyncio.sleep(0.1)


async def settle(js: JetStreamContext, consumers: list[tuple[str, str]], timeout: float) -> None:
    """Until no consumer has a message pending or unacked: the work is done."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for stream, durable in consumers:
            info = await js.consumer_info(stream, durable)
            if info.num_pending or info.num_ack_pending:
                busy.append(durable)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumers still busy after {timeout}s: {busy}")
        await asyncio.sleep(0.05)


def flow_consumers(topology: Topology) -> dict[str, list[tuple[str, str]]]:
    """function -> its (stream, durable) consumers."""
    return {
        name: [(c.stream, c.durable) for c in fn.consumers]
        for name, fn in topology.functions.items()
    }


async def sample_backlog(
    js: JetStreamContext, consumers: dict[str, list[tuple[str, str]]], samples: dict[str, list[int]]
) -> None:
    """Every 0.25 s, how many messages each function has not finished (until cancelled)."""
    while True:
        for name, specs in consumers.items():
            total = 0
            for stream, durable in specs:
                with contextlib.suppress(Exception):
                    info = await js.consumer_info(stream, durable)
                    total += (info.num_pending or 0) + (info.num_ack_pending or 0)
            samples[name].append(total)
        await asyncio.sleep(0.25)


async def last_sequences(js: JetStreamContext, streams: list[str]) -> dict[str, int]:
    """What was ever appended to each stream (deletes included)."""
    return {name: int((await js.stream_info(name)).state.last_seq) for name in streams}


# --- the flow -------------------------------------------------------------------------


@dataclass
class FlowResult:
    load: str  # "saturation" or "<rate>/s"
    replicas: dict[str, int]
    orders: int
    completed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    wrong_outcome: int = 0
    duplicates: int = 0  # orders with more than one terminal event in the log
    # Terminal events seen again by a subscriber but refused by the log (a
    # redelivery, or both halves of a join deciding): the guard at work.
    announced_again: int = 0
    functions_died: int = 0
    error: str = ""  # the run could not be measured (functions never ready, warm-up failed...)
    elapsed_s: float = 0.0  # first publish -> last terminal event
    orders_per_s: float = 0.0
    publish_rate: float = 0.0  # what the driver actually offered
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    latency_by_path_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    # From the first publish until every consumer has settled its messages.
    cpu: Usage = field(default_factory=Usage)
    # Messages into / out of the server (/varz), and per connection name (/connz).
    msgs_in: int = 0
    msgs_out: int = 0
    msgs_by_connection: dict[str, list[int]] = field(default_factory=dict)
    appended: dict[str, int] = field(default_factory=dict)  # stream -> messages appended
    kv_streams: list[str] = field(default_factory=list)
    # num_pending + num_ack_pending of each function's consumers, sampled every 0.25 s.
    backlog_mean: dict[str, float] = field(default_factory=dict)
    backlog_max: dict[str, int] = field(default_factory=dict)
    warmup: int = 0  # orders sent before the measured ones
    traced: bool = False  # every function exporting spans (--runs traced)
    spans: int = 0  # spans the receiver got, warm-up included
    span_requests: int = 0  # OTLP export requests it got

    @property
    def failed(self) -> bool:
        problems = (self.unfinished, self.wrong_outcome, self.duplicates, self.functions_died)
        return any(problems) or bool(self.error)

    def per_order(self, value: float) -> float:
        return value / self.orders if self.orders else 0.0

    @property
    def driver_msgs(self) -> list[int]:
        return self.msgs_by_connection.get(DRIVER, [0, 0])

    @property
    def kv_appends(self) -> int:
        return sum(self.appended.get(name, 0) for name in self.kv_streams)


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
        await nc.subscribe(subjects.subject(kind, "*"), cb=tally.on_terminal)
        for kind in sorted(TERMINAL_SUBJECTS)
    ]
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    last_publish = 0.0

    async def publish(order: OrderCreated) -> None:
        nonlocal last_publish
        async with window:
            # Latency counts from here: the moment the order is handed to the client.
            tally.published[order.order_id] = last_publish = time.monotonic()
            await js.publish(subjects.INGRESS, payload(order))

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


async def stored_twice(js: JetStreamContext, stream: str, order_ids: set[str]) -> int:
    """Orders of ``order_ids`` with more than one terminal event stored (subject counts)."""
    per_order: Counter[str] = Counter()
    for kind in sorted(TERMINAL_SUBJECTS):
        info = await js.stream_info(stream, subjects_filter=subjects.subject(kind, "*"))
        for subject, count in (info.state.subjects or {}).items():
            order_id, _ = subjects.parse(subject)
            if order_id in order_ids:
                per_order[order_id] += count
    return sum(1 for count in per_order.values() if count > 1)


async def measure_flow(
    server: MonitoredServer,
    topology: Topology,
    fleet: Fleet,
    result: FlowResult,
    orders: list[tuple[str, OrderCreated]],
    warmup: list[tuple[str, OrderCreated]],
    rate: float | None,
    timeout: float,
    on_start: Callable[[dict[str, list[int]]], None] | None = None,
) -> None:
    nc = await nats.connect(server.url, name=DRIVER)
    try:
        js = nc.jetstream()
        consumers = flow_consumers(topology)
        every = [c for specs in consumers.values() for c in specs]
        await wait_ready(
            js, {c: result.replicas[name] for name, specs in consumers.items() for c in specs}
        )
        # Warm up: every process has connected, bound, imported what it lazily
        # imports and handled each kind of message once before the clock starts.
        tally, _, _ = await offer(nc, warmup, None, timeout)
        if len(tally.finished) < len(warmup):
            raise RuntimeError(f"warm-up: {len(warmup) - len(tally.finished)} orders unfinished")
        await settle(js, every, timeout)

        streams = [s.name for s in topology.streams]
        result.kv_streams = [stream_name(b.name) for b in topology.buckets]
        pids = fleet.pids()
        samples: dict[str, list[int]] = {name: [] for name in consumers}
        appended = await last_sequences(js, streams + result.kv_streams)
        traffic = await server.traffic()
        sampler = asyncio.create_task(sample_backlog(js, consumers, samples))
        before = snapshot(server.pid, pids)
        try:
            tally, start, last_publish = await offer(
                nc, orders, rate, timeout, None if on_start is None else lambda: on_start(pids)
            )
            with contextlib.suppress(TimeoutError):
                await settle(js, every, timeout)
        finally:
            after = snapshot(server.pid, pids)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        moved = (await server.traffic()).since(traffic)
        appended_after = await last_sequences(js, streams + result.kv_streams)
        ids = {order.order_id for _, order in orders}
        result.duplicates = await stored_twice(js, topology.events_stream, ids)
    finally:
        await nc.close()

    outcomes = Counter(outcome for outcome, _ in tally.finished.values())
    result.completed, result.cancelled = outcomes["completed"], outcomes["cancelled"]
    result.unfinished = len(orders) - len(tally.finished)
    result.announced_again = tally.duplicates
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
    result.cpu = usage(before, after)
    result.msgs_in, result.msgs_out = moved.in_msgs, moved.out_msgs
    result.msgs_by_connection = moved.by_name
    result.appended = {name: appended_after[name] - appended[name] for name in appended}
    result.backlog_mean = {n: round(sum(s) / len(s), 1) if s else 0.0 for n, s in samples.items()}
    result.backlog_max = {n: max(s, default=0) for n, s in samples.items()}


@dataclass
class Setup:
    """What every run shares: the topology (streams.yaml, maybe with experiment overrides)."""

    topology: Topology
    overridden: bool
    warmup: int
    timeout: float
    store_root: Path | None  # where the fresh store dirs go (None: the system's temp dir)


def config_file(setup: Setup, tmp: Path) -> Path:
    """streams.yaml, or, with experiment overrides, the changed topology written to ``tmp``."""
    if not setup.overridden:
        return CONFIG
    # The functions read their settings from a file: hand them the changed one.
    config = tmp / "streams.yaml"
    config.write_bytes(msgspec.yaml.encode(setup.topology))
    return config


def run_flow(
    setup: Setup,
    load: str,
    replicas: dict[str, int],
    orders: list[tuple[str, OrderCreated]],
    rate: float | None,
    on_start: Callable[[dict[str, list[int]]], None] | None = None,
    traced: bool = False,
) -> FlowResult:
    """One configuration on its own fresh server; every process is stopped on the way out.

    ``traced``: the functions export their spans to a receiver in this process
    (its CPU counts as the driver's); they flush what they buffered as they stop.
    """
    result = FlowResult(load, replicas, len(orders), traced=traced)
    if traced:
        from bench import otlp  # here: it needs opentelemetry-proto (the extra otel)

        with otlp.OtlpReceiver(keep=False) as receiver:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
            _run_flow(setup, result, orders, rate, on_start, env)
        result.spans, result.span_requests = receiver.received, receiver.requests
        if not result.spans and not result.error:
            result.error = "tracing on, and no span arrived"
    else:
        _run_flow(setup, result, orders, rate, on_start, None)
    outcome = "ok"
    if result.failed:
        outcome = "FAILED: " + (
            result.error
            or f"{result.unfinished} unfinished, {result.wrong_outcome} wrong outcome, "
            f"{result.duplicates} with two terminal events stored, "
            f"{result.functions_died} processes died"
        )
    spans = f", {result.spans} spans" if traced else ""
    say(f"        {'':<24} -> {result.orders_per_s} orders/s, p50 {result.p50_ms} ms, "
        f"p99 {result.p99_ms} ms{spans}, {outcome}")  # fmt: skip
    return result


def _run_flow(
    setup: Setup,
    result: FlowResult,
    orders: list[tuple[str, OrderCreated]],
    rate: float | None,
    on_start: Callable[[dict[str, list[int]]], None] | None,
    env: dict[str, str] | None,
) -> None:
    replicas, result.warmup = result.replicas, setup.warmup
    say(f"  flow  {label(result):<24} {len(orders)} orders ...")
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-", dir=setup.store_root) as tmp:
        config = config_file(setup, Path(tmp))
        server = MonitoredServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(provision_at(server.url, setup.topology, ROOT))
            log_dir = Path(tmp) / "logs"
            fleet = FlowFleet(server.url, config, replicas, log_dir, env)
            try:
                fleet.start()
                warmup = make_orders(setup.warmup, run_id="warmup", seed=7)
                asyncio.run(
                    measure_flow(server, setup.topology, fleet, result, orders, warmup, rate,
                                 setup.timeout, on_start)
                )  # fmt: skip
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            finally:
                fleet.stop()
                if result.failed:
                    show_logs(log_dir)
        finally:
            server.stop()


# --- the reference chain ----------------------------------------------------------------


@dataclass
class ChainResult:
    messages: int
    in_flight: int
    workers: int
    batch: int
    through: int = 0
    error: str = ""
    elapsed_s: float = 0.0
    msgs_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu: Usage = field(default_factory=Usage)
    msgs_in: int = 0
    msgs_out: int = 0
    msgs_by_connection: dict[str, list[int]] = field(default_factory=dict)
    appended: dict[str, int] = field(default_factory=dict)
    stages_died: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.through < self.messages or bool(self.stages_died)

    def per_message(self, value: float) -> float:
        return value / self.messages if self.messages else 0.0


CHAIN_WARMUP = 512


async def measure_chain(server: MonitoredServer, fleet: ChainFleet, result: ChainResult,
                        timeout: float) -> None:  # fmt: skip
    nc = await nats.connect(server.url, name=DRIVER)
    try:
        js = nc.jetstream()
        consumers = [(chain.STREAM, name) for name in chain.STAGES]
        await wait_ready(js, dict.fromkeys(consumers, 1))
        warm = await chain.drive(nc, CHAIN_WARMUP, result.in_flight, timeout, prefix="w")
        if warm["through"] < CHAIN_WARMUP:
            raise RuntimeError(f"chain warm-up: {CHAIN_WARMUP - warm['through']:.0f} stuck")
        await settle(js, consumers, timeout)
        pids = fleet.pids()
        streams = [chain.STREAM, f"KV_{chain.BUCKET}"]
        appended = await last_sequences(js, streams)
        traffic: Traffic = await server.traffic()
        before = snapshot(server.pid, pids)
        try:
            done = await chain.drive(nc, result.messages, result.in_flight, timeout)
            with contextlib.suppress(TimeoutError):
                await settle(js, consumers, timeout)
        finally:
            after = snapshot(server.pid, pids)
        moved = (await server.traffic()).since(traffic)
        appended_after = await last_sequences(js, streams)
    finally:
        await nc.close()
    result.through = int(done["through"])
    result.elapsed_s = done["elapsed_s"]
    result.msgs_per_s = done["msgs_per_s"]
    result.p50_ms, result.p99_ms = done["p50_ms"], done["p99_ms"]
    result.cpu = usage(before, after)
    result.msgs_in, result.msgs_out = moved.in_msgs, moved.out_msgs
    result.msgs_by_connection = moved.by_name
    result.appended = {name: appended_after[name] - appended[name] for name in appended}
    result.stages_died = sum(1 for ps in fleet.pids().values() if not ps)


def run_chain(setup: Setup, messages: int, in_flight: int, workers: int, batch: int) -> ChainResult:
    """The reference on its own fresh server: setup, 3 stage processes, the driver here."""
    result = ChainResult(messages, in_flight, workers, batch)
    say(f"  chain {messages} messages, {in_flight} in flight ...")
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-", dir=setup.store_root) as tmp:
        server = MonitoredServer(Path(tmp) / "nats")
        server.start()
        try:

            async def prepare() -> None:
                nc = await nats.connect(server.url, name="bench-chain-setup")
                try:
                    await chain.setup(nc.jetstream())
                finally:
                    await nc.close()

            asyncio.run(prepare())
            fleet = ChainFleet(server.url, Path(tmp) / "logs", workers, batch)
            try:
                fleet.start()
                asyncio.run(measure_chain(server, fleet, result, setup.timeout))
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            finally:
                fleet.stop()
                if result.failed:
                    show_logs(fleet.log_dir)
        finally:
            server.stop()
    outcome = "ok" if not result.failed else f"FAILED: {result.error or 'messages stuck'}"
    say(f"        -> {result.msgs_per_s} msgs/s, p50 {result.p50_ms} ms, {outcome}")
    return result


# --- trace and stuck at size -------------------------------------------------------------


def run_history(setup: Setup, sizes: list[int], cold: bool) -> list[history_mod.SizeResult]:
    """One fresh server; ORDERS grown to each size in turn, trace and stuck timed at each."""
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-", dir=setup.store_root) as tmp:
        server = MonitoredServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(provision_at(server.url, setup.topology, ROOT))
            return asyncio.run(
                history_mod.run(
                    server.url, setup.topology, ROOT, server.store_dir, sizes, say, cold
                )
            )
        finally:
            server.stop()


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
    # Atomic batches allowed, for the rows that measure what one would cost.
    config = dataclasses.replace(bucket_config(BucketSpec(bucket, storage)), allow_atomic=True)
    await ensure_stream(nc.jetstream(), config, Report())
    store = KvStore(nc, bucket)
    await store.commit(Write("level.x", Level(1), 0))

    def new_keys(op: str, i: int, n: int) -> list[Write]:
        return [Write(f"{op}.{i}.{k}", Level(i), 0) for k in range(n)]

    async def atomic(writes: list[Write]) -> None:
        # What a multi-key commit would cost: a JetStream atomic batch, every
        # write with its own
        # expected sequence, only the last one (the commit) answered. The
        # runtime never sends one (orderflow/runtime/kv.py says why).
        batch_id = f"probe-{time.monotonic_ns()}"
        for sequence, write in enumerate(writes, start=1):
            headers = {
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": str(sequence),
                "Nats-Expected-Last-Subject-Sequence": str(write.revision),
            }
            subject, data = f"$KV.{bucket}.{write.key}", msgspec.json.encode(write.value)
            if sequence < len(writes):
                await nc.publish(subject, data, headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                reply = await nc.request(subject, data, headers=headers)
                assert b'"error"' not in reply.data, reply.data

    # A whole stock reservation through the handler: 2 SKUs (reads, writes, settling).
    for sku in ("A", "B"):
        await store.commit(Write(stock.level_key(sku), Level(10**9), 0))

    def reservation(i: int) -> Awaitable[object]:
        items = [OrderItem("A", 1, 100), OrderItem("B", 1, 100)]
        return stock.handle(OrderCreated(f"probe-{i}", "c-1", items, "tok"), store)

    operations: dict[str, Callable[[int], Awaitable[object]]] = {
        "get": lambda i: store.get("level.x", Level),
        "compare-and-set, 1 key": lambda i: store.commit(new_keys("one", i, 1)[0]),
        "atomic batch, 2 keys": lambda i: atomic(new_keys("two", i, 2)),
        "atomic batch, 4 keys": lambda i: atomic(new_keys("four", i, 4)),
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
        f"KV operations through orderflow.runtime.kv.KvStore, one at a time ({KV_PROBES} of each)",
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
        result = run_flow(setup, "saturation", base, orders, None, attach)
    finally:
        for spy in spies:
            try:
                spy.wait(seconds + 10)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    errors = b"".join(spy.stderr.read() for spy in spies if spy.stderr).decode(errors="replace")
    summary = summarise_profile(out) if out.exists() and out.stat().st_size else {}
    return {"function": function, "seconds": seconds, "raw": str(out),
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
    for area in ("nats/", "msgspec", "orderflow/", "functions/", "asyncio/", "logging/"):
        if area in frame:
            return area.rstrip("/")
    return "other (stdlib, interpreter)"


def _ours(frame: str) -> bool:
    return any(part in frame for part in ("(orderflow/", "(functions/"))


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
        f"py-spy on {profile['function']} during a saturation run: "
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


def label(result: FlowResult) -> str:
    extra = [f"{n} x{c}" for n, c in result.replicas.items() if c > 1]
    extra += ["traced"] if result.traced else []
    return result.load + (f", {', '.join(extra)}" if extra else "")


def render_header(info: dict[str, str], settings: dict[str, Any]) -> str:
    rates = ", ".join(f"{r:g}" for r in settings["rates"])
    out = [
        f"machine   {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, Python "
        f"{info['python']}, nats-server {info['nats_server']}, nats-py {info['nats_py']}; "
        f"load average {info['load_before']} before",
        f"runtime   orderflow at {info['runtime']}",
        f"settings  chain: {settings['chain_messages']} messages, {settings['in_flight']} in "
        f"flight, {settings['chain_workers']} fetch loops x batch {settings['chain_batch']} per "
        f"stage; flow saturation: {settings['orders']} orders, at most {PUBLISH_WINDOW} "
        f"publishes awaiting their ack; rates: {rates} orders/s for {settings['duration']:g} s; "
        f"{settings['warmup']} warm-up orders; a fresh nats-server per row",
    ]
    if settings["overrides"]:
        out.append(f"overrides {'; '.join(settings['overrides'])} (an experiment)")
    return "\n".join(out)


def _pair(values: list[int], n: int) -> str:
    return f"{values[0] / n:.2f} / {values[1] / n:.2f}" if n else "-"


def render_chain(r: ChainResult) -> str:
    n = r.messages
    stages = [v for k, v in r.msgs_by_connection.items() if k.startswith("chain-")]
    stage_msgs = [sum(v[0] for v in stages), sum(v[1] for v in stages)]
    per_stage = ", ".join(f"{k} {v * 1000 / n:.2f}" for k, v in r.cpu.by_process_s.items())
    kv = r.appended.get(f"KV_{chain.BUCKET}", 0)
    driver = r.msgs_by_connection.get(DRIVER, [0, 0])
    lines = [
        "",
        "the reference: bench/chain.py, 3 processes, 4 JetStream hops, 1 KV join (get + put)",
        f"  messages through            {r.through} of {r.messages} in {r.elapsed_s:.2f} s: "
        f"{r.msgs_per_s:.1f} msgs/s" + ("" if not r.failed else f"  FAILED {r.error}"),
        f"  latency p50 / p99           {r.p50_ms:.1f} / {r.p99_ms:.1f} ms (queueing: "
        f"{r.in_flight} in flight)",
        f"  CPU ms per message          server {r.cpu.server_s * 1000 / n:.2f} + stages "
        f"{r.cpu.processes_s * 1000 / n:.2f} ({per_stage}); driver "
        f"{r.cpu.driver_s * 1000 / n:.2f}",
        f"  msgs in / out per message   server {r.msgs_in / n:.2f} / {r.msgs_out / n:.2f}; "
        f"stages {_pair(stage_msgs, n)}; driver {_pair(driver, n)}",
        f"  appended per message        {chain.STREAM} {r.appended.get(chain.STREAM, 0) / n:.2f}, "
        f"KV {kv / n:.2f}",
        f"  machine                     busy {r.cpu.machine_busy_pct:.0f} %, other programs "
        f"{r.cpu.machine_other_pct:.0f} %, steal {r.cpu.machine_steal_pct:.0f} %",
    ]  # fmt: skip
    return "\n".join(lines)


def render_flow(results: list[FlowResult]) -> str:
    out = [
        "",
        "the flow: streams.yaml, one process per function, the demo's order mix",
        f"{'load':<22}{'orders':>7}{'orders/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'happy p50':>11}"
        f"{'happy p99':>11}{'CPU ms/order':>14}{'msgs/order':>13}{'KV':>6}{'busy':>6}"
        f"{'other':>7}  ok",
        f"{'':<22}{'':>7}{'':>10}{'':>9}{'':>9}{'ms':>11}{'ms':>11}{'server+fns':>14}"
        f"{'in/out':>13}{'apps':>6}{'%':>6}{'%':>7}",
    ]
    for r in results:
        n = r.orders or 1
        happy = r.latency_by_path_ms.get("happy", {})
        cpu = f"{r.cpu.server_s * 1000 / n:.2f}+{r.cpu.processes_s * 1000 / n:.2f}"
        msgs = f"{r.msgs_in / n:.1f}/{r.msgs_out / n:.1f}"
        out.append(
            f"{label(r):<22}{r.orders:>7}{r.orders_per_s:>10.1f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{happy.get('p50', 0.0):>11.1f}{happy.get('p99', 0.0):>11.1f}{cpu:>14}{msgs:>13}"
            f"{r.kv_appends / n:>6.2f}{r.cpu.machine_busy_pct:>6.0f}{r.cpu.machine_other_pct:>7.0f}"
            f"  {'FAIL' if r.failed else 'ok'}"
        )
    names = list(results[0].replicas) if results else []
    out += [
        "",
        "per function: CPU ms per order (all replicas) | msgs to / from the server per order "
        "| mean consumer backlog",
        f"{'load':<22}{'function':<10}{'CPU ms':>8}{'to / from':>16}{'backlog':>9}",
    ]
    for r in results:
        n = r.orders or 1
        for name in [*names, DRIVER]:
            used = r.cpu.by_process_s.get(name)
            moved = r.msgs_by_connection.get(f"orderflow-{name}", r.msgs_by_connection.get(name))
            out.append(
                f"{label(r):<22}{name:<10}"
                + (f"{used * 1000 / n:>8.2f}" if used is not None else f"{'':>8}")
                + f"{_pair(moved, n) if moved else '-':>16}"
                + (f"{r.backlog_mean[name]:>9.0f}" if name in r.backlog_mean else "")
            )
        stored = ", ".join(f"{k} {v / n:.2f}" for k, v in r.appended.items() if v)
        again = f"; terminal events announced again, refused by the log: {r.announced_again}"
        out.append(f"{'':<22}appended per order: {stored}{again}")
    disturbed = [f"{label(r)} ({r.cpu.machine_other_pct:.0f}%)" for r in results
                 if r.cpu.machine_other_pct > OTHER_CPU_WARNING]  # fmt: skip
    if disturbed:
        out.append(f"warning: other programs used the machine during: {', '.join(disturbed)}")
    return "\n".join(out)


def ratios_of(chain_result: ChainResult | None, flows: list[FlowResult]) -> dict[str, float]:
    """The flow against the reference, from this run's rows."""
    saturated = next(
        (r for r in flows
         if r.load == "saturation" and max(r.replicas.values()) == 1 and not r.traced),
        None,
    )  # fmt: skip
    if chain_result is None or saturated is None or chain_result.failed or saturated.failed:
        return {}
    n, m = saturated.orders or 1, chain_result.messages or 1
    flow_cpu = (saturated.cpu.server_s + saturated.cpu.processes_s) / n
    chain_cpu = (chain_result.cpu.server_s + chain_result.cpu.processes_s) / m
    ratios = {
        "flow orders/s / chain msgs/s": saturated.orders_per_s / chain_result.msgs_per_s,
        "CPU per order / CPU per chain message": flow_cpu / chain_cpu if chain_cpu else 0.0,
        "server CPU per order / per chain message": (
            (saturated.cpu.server_s / n) / (chain_result.cpu.server_s / m)
            if chain_result.cpu.server_s
            else 0.0
        ),
        "msgs into the server per order / per chain message": (
            (saturated.msgs_in / n) / (chain_result.msgs_in / m) if chain_result.msgs_in else 0.0
        ),
    }
    return {name: round(value, 3) for name, value in ratios.items()}


def tracing_of(flows: list[FlowResult]) -> dict[str, float]:
    """What tracing costs, from this run's plain and traced saturation rows; and what its hooks
    cost a message when it is off (timed in this process)."""
    plain = next((r for r in flows if r.load == "saturation" and not r.traced
                  and max(r.replicas.values()) == 1 and not r.failed), None)  # fmt: skip
    traced = next((r for r in flows if r.traced and not r.failed), None)
    out = {"off: hooks per message, ns": round(off_hooks_ns(), 1)}
    if plain is None or traced is None:
        return out
    cpu = [(r.cpu.server_s + r.cpu.processes_s) / (r.orders or 1) for r in (plain, traced)]
    out |= {
        "traced orders/s / untraced": round(traced.orders_per_s / plain.orders_per_s, 3),
        "traced CPU per order / untraced": round(cpu[1] / cpu[0], 3) if cpu[0] else 0.0,
        "traced functions' CPU ms per order, more": round(
            (traced.cpu.processes_s - plain.cpu.processes_s) * 1000 / (plain.orders or 1), 3
        ),
        "spans per order (warm-up included)": round(
            traced.spans / (traced.orders + traced.warmup), 2
        ),
    }
    return out


def off_hooks_ns(messages: int = 200_000, repeat: int = 5) -> float:
    """Nanoseconds per message the worker spends on tracing when it is off: one ``with`` of
    ``OFF.processing`` (a publish costs nothing: the emitter stores with election.store).
    The best of ``repeat`` loops, less the empty loop's time, as timeit reports."""
    consumer = ConsumerSpec(durable="bench", stream="ORDERS", events=["orders.created"])
    msg = object()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(messages):
            with OFF.processing(msg, consumer):  # type: ignore[arg-type]
                pass
        looped = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        for _ in range(messages):
            pass
        best = min(best, (looped - (time.perf_counter_ns() - start)) / messages)
    return best


def render_tracing(ratios: dict[str, float]) -> str:
    out = ["", "tracing (this run: the saturation row with every function exporting spans)"]
    out += [f"  {name:<52}{value:>9.3f}" for name, value in ratios.items()]
    return "\n".join(out)


def render_ratios(ratios: dict[str, float]) -> str:
    out = ["", "flow / chain (this run)"]
    out += [f"  {name:<52}{value:>7.3f}" for name, value in ratios.items()]
    return "\n".join(out)


def render_history(rows: list[history_mod.SizeResult]) -> str:
    out = [
        "",
        "trace and stuck against a long history (in-process: median of "
        f"{history_mod.TRACE_REPEAT} traces, {history_mod.STUCK_REPEAT} stucks; first call)",
        f"{'messages':>10}{'blocks':>7}{'MB':>6}{'trace old':>16}{'middle':>16}{'recent':>16}"
        f"{'in_flight':>11}{'stuck':>18}{'found':>6}{'CLI trace':>10}{'CLI stuck':>10}",
        f"{'':>10}{'':>7}{'':>6}{'ms (first)':>16}{'ms (first)':>16}{'ms (first)':>16}"
        f"{'ms':>11}{'ms (PING wait)':>18}{'':>6}{'s':>10}{'s':>10}",
    ]
    for r in rows:

        def cell(t: history_mod.Timed | None) -> str:
            return f"{t.median_ms:.1f} ({t.first_ms:.1f})" if t else "-"

        stuck = f"{r.stuck.median_ms:.0f} ({r.stuck_ping_wait_s * 1000:.0f})" if r.stuck else "-"
        in_flight = f"{r.in_flight.median_ms:.1f}" if r.in_flight else "-"
        out.append(
            f"{r.messages:>10,}{r.blocks:>7}{r.stream_bytes / 1e6:>6.0f}"
            f"{cell(r.trace.get('old')):>16}"
            f"{cell(r.trace.get('middle')):>16}{cell(r.trace.get('recent')):>16}{in_flight:>11}"
            f"{stuck:>18}{r.stuck_found:>6}{r.cli_trace_s:>10.2f}{r.cli_stuck_s:>10.2f}"
        )
        if r.trace_cold_ms:
            cold = ", ".join(f"{k} {v:.1f}" for k, v in r.trace_cold_ms.items())
            out.append(f"{'':>10}  after {history_mod.COLD_WAIT_S:g} s idle, one trace each, ms: "
                       f"{cold}")  # fmt: skip
        for problem in r.problems:
            out.append(f"  PROBLEM: {problem}")
    return "\n".join(out)


def pick_busiest(result: FlowResult) -> tuple[str, str]:
    """The function whose consumers had the most unfinished messages on average.

    At saturation every consumer gets the whole burst at once; the one whose
    backlog stays large longest is the one the flow waits for. (The function
    using the most CPU need not be it: a function can wait on the server.)
    """
    name = max(result.backlog_mean, key=lambda n: result.backlog_mean[n])
    by_cpu = result.cpu.by_process_s
    cpu = max(by_cpu, key=lambda n: by_cpu[n])
    return name, (
        f"largest mean consumer backlog at saturation, {result.backlog_mean[name]:.0f} msgs; "
        f"most CPU: {cpu}, {result.per_order(by_cpu[cpu]) * 1000:.2f} ms per order"
    )


# --- the command line ------------------------------------------------------------

RUNS = ("chain", "saturation", "traced", "rates", "replicas", "history", "kv")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = p.add_argument
    add("--runs", default="chain,saturation,rates",
        help=f"which runs, of {', '.join(RUNS)} (default chain,saturation,rates; traced: "
        "saturation with every function exporting spans)")  # fmt: skip
    add("--orders", type=int, default=800, help="orders per saturation run (default 800)")
    add("--rates", default="100", help="offered rates, orders/s (default 100)")
    add("--duration", type=float, default=5.0, help="seconds each rate is offered (default 5)")
    add("--warmup", type=int, default=40, help="unmeasured orders before each flow run")
    add("--chain-messages", type=int, default=10_000, help="messages through the chain")
    add("--in-flight", type=int, default=512, help="messages in the chain at once (default 512)")
    add("--chain-workers", type=int, default=chain.WORKERS, help="fetch loops per chain stage")
    add("--chain-batch", type=int, default=chain.BATCH, help="batch of each fetch")
    add("--history-sizes", default="10000,100000,1000000",
        help="messages in ORDERS at which trace and stuck are timed")  # fmt: skip
    add("--history-cold", action="store_true",
        help=f"also one trace each after {history_mod.COLD_WAIT_S:g} s idle")  # fmt: skip
    add("--json-out", type=Path, metavar="FILE", help="also write the JSON to FILE")
    add("--replicas", type=int, default=2, help="replicas of the busiest function (default 2)")
    add("--busiest", help="the function to replicate (default: found at saturation)")
    add("--seed", type=int, default=42, help="seed of the order mix")
    add("--timeout", type=float, default=180.0, help="seconds to wait for a run's last order")
    add("--json", action="store_true", help="print one JSON object instead of the tables")
    add("--profile", action="store_true",
        help="after the runs, py-spy the busiest function during a saturation run")  # fmt: skip
    add("--profile-function", help="profile this function instead of the busiest")
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
    sizes = [int(s) for s in args.history_sizes.split(",") if s.strip()]
    if not runs <= set(RUNS):
        raise SystemExit(f"--runs takes {', '.join(RUNS)}")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: processes get stopped

    signal.signal(signal.SIGTERM, terminate)
    topology, overrides = apply_overrides(
        config_mod.load(CONFIG), args.concurrency, args.memory_bucket
    )
    setup = Setup(topology, bool(overrides), args.warmup, args.timeout, args.store_root)
    base = dict.fromkeys(topology.functions, 1)
    info = machine()
    if args.store_root:
        overrides.append(f"stores under {args.store_root}")
    settings = {"orders": args.orders, "rates": rates, "duration": args.duration,
                "warmup": args.warmup, "seed": args.seed, "overrides": overrides,
                "chain_messages": args.chain_messages, "in_flight": args.in_flight,
                "chain_workers": args.chain_workers, "chain_batch": args.chain_batch,
                "history_sizes": sizes}  # fmt: skip
    if not args.json:
        say(f"machine: {json.dumps(info)}")
    # The same orders, ids included, go through every configuration.
    orders = make_orders(args.orders, run_id="bench", seed=args.seed)

    chain_result = None
    if "chain" in runs:
        chain_result = run_chain(
            setup, args.chain_messages, args.in_flight, args.chain_workers, args.chain_batch
        )
    flows: list[FlowResult] = []
    if "saturation" in runs:
        flows.append(run_flow(setup, "saturation", base, orders, None))
    if "traced" in runs:
        flows.append(run_flow(setup, "saturation", base, orders, None, traced=True))
    if "rates" in runs:
        for rate in rates:
            offered = make_orders(max(1, round(rate * args.duration)), "bench", args.seed)
            flows.append(run_flow(setup, f"{rate:g}/s", base, offered, rate))

    busiest_info: dict[str, str] = {}
    measured = [r for r in flows if r.load == "saturation" and not r.failed]
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
        flows.append(run_flow(setup, "saturation", scaled, orders, None))

    sized = run_history(setup, sizes, args.history_cold) if "history" in runs else []
    kv = kv_run(setup) if "kv" in runs else []

    profile = None
    if args.profile:
        target = args.profile_function or busiest_info.get("function")
        if target not in topology.functions:
            known = ", ".join(topology.functions)
            raise SystemExit(f"--profile: give --profile-function ({known}) or run saturation")
        out = args.profile_out or Path(tempfile.gettempdir()) / f"pyspy-{target}.txt"
        say(f"profiling {target} with py-spy -> {out}")
        profiled = make_orders(args.profile_orders, run_id="bench", seed=args.seed)
        profile = profile_run(setup, target, profiled, args.profile_seconds, out)

    ratios = ratios_of(chain_result, flows)
    tracing = tracing_of(flows) if "traced" in runs else {}
    info["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    everything = json.dumps({"machine": info, "settings": settings,
                             "chain": asdict(chain_result) if chain_result else None,
                             "flow": [asdict(r) for r in flows], "ratios_flow_over_chain": ratios,
                             "tracing": tracing,
                             "busiest": busiest_info, "history": [asdict(r) for r in sized],
                             "kv": kv, "profile": profile})  # fmt: skip
    if args.json_out:
        args.json_out.write_text(everything + "\n")
    if args.json:
        print(everything)
    else:
        print(render_header(info, settings))
        if chain_result is not None:
            print(render_chain(chain_result))
        if flows:
            print(render_flow(flows))
        if busiest_info:
            print(f"\nbusiest function: {busiest_info['function']} ({busiest_info['why']})")
        if ratios:
            print(render_ratios(ratios))
        if tracing:
            print(render_tracing(tracing))
        if sized:
            print(render_history(sized))
        if kv:
            print(render_kv(kv))
        if profile is not None:
            print(render_profile(profile))
        print(f"\nload average after: {info['load_after']}")
    failed = [label(r) for r in flows if r.failed]
    if chain_result is not None and chain_result.failed:
        failed.append("chain")
    failed += [f"history {r.messages}" for r in sized if r.problems]
    if failed:
        say(f"FAILED (unfinished, wrong or doubled outcomes, a dead process): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
