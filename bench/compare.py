"""``compare``: choreography and orchestration on the same orders, measured side by side.

The usual table weighs the two styles with adjectives: loose or tight
coupling, a single point of failure, hard or easy to trace, extra hops. Both
wirings here run the same handlers (``streams.yaml``'s ``functions`` and its
``orchestration`` section), so the adjectives can be measured. Each mode gets
a fresh embedded server, provisioned from the same file, one OS process per
function (``Supervisor``), and the same orders (``demo.make_orders``, same
seed, same ids). Measured:

* speed: N orders published at once, as ``demo`` does (throughput, and
  latency that is mostly queueing), then a few at a light steady rate (what
  the hops cost), and the length of each order's causal chain;
* cost: messages appended per order to every stream and KV bucket (a KV
  append is a state write), consumer deliveries, CPU seconds of the server
  and of each function process (``/proc/<pid>/stat``);
* coupling, from the topology alone: the subjects each function consumes and
  emits, the functions whose events it reads, and which functions a new step
  modelled on ``stock`` (it can fail and must be compensated) would change;
* explaining one order: the log entries carrying its correlation id (what
  ``trace`` reads, plus its timers), the streams and functions among them, the
  KV records naming it;
* outages: under a steady stream of orders, each function in turn is
  SIGKILLed, kept down (nothing watches the supervisor's children, so nothing
  restarts it early) and started again: which orders still finished while it
  was down, which made progress, which waited, how long the backlog took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from bench.cpu import CLOCK_TICKS, cpu_model, cpu_seconds, machine_ticks
from functions.events import EVENT_TYPES, TERMINAL_SUBJECTS, Command, OrderCreated
from orderflow import config as config_mod
from orderflow import subjects
from orderflow.config import MODES, Topology
from orderflow.ops.provision import provision_at
from orderflow.ops.server import EmbeddedServer
from orderflow.ops.supervisor import Supervisor
from orderflow.runtime.connect import connect
from orderflow.runtime.context import FUNCTION
from orderflow.runtime.kv import stream_name
from orderflow.tools import demo
from orderflow.tools import trace as trace_mod
from orderflow.tools.replay import wait_until_quiet
from orderflow.tools.streamlog import Stored, read_stream, read_subject

#: The step a new one is modelled on when counting who would have to change:
#: stock can fail, and its failure and its success are read by others.
MODEL_STEP = "stock"

#: What the business does for an order (not a command, alarm or announcement):
#: an event of one of these kinds means the order moved while something was down.
WORK_PREFIXES = ("payments.", "stock.", "delivery.")


def is_command(kind: str) -> bool:
    """An orchestrator's command (``saga.payment.charge``), not an event of the business."""
    cls = EVENT_TYPES.get(kind)
    return cls is not None and issubclass(cls, Command)


@dataclass
class Settings:
    orders: int = 300  # published at once: throughput, saturation latency, cost
    seed: int = 42
    paced: int = 40  # published at `rate` before the outages: hop latency
    rate: float = 20.0  # orders/s during the paced run and the outages
    outage_s: float = 3.0  # how long a stopped function stays down
    lead_s: float = 1.0  # steady orders before the kill
    tail_s: float = 1.0  # steady orders after the restart
    warmup: int = 20  # unmeasured orders first: imports, connections, first KV reads
    timeout: float = 60.0  # the longest any phase waits for its orders
    repeat: int = 1  # speed runs per mode, interleaved; the table shows medians
    # Functions to stop, per mode (default: every function of the mode).
    stop: dict[str, list[str]] = field(default_factory=dict)


# --- coupling, from the topology --------------------------------------------


@dataclass
class FunctionCoupling:
    consumes: list[str]
    emits: list[str]
    subjects: int  # how many distinct subjects the function must know
    reads_from: list[str]  # functions (or "client") whose events it consumes
    read_by: list[str]  # other functions that consume what it emits


@dataclass
class Coupling:
    functions: dict[str, FunctionCoupling]
    subjects_known: int  # summed over functions
    dependencies: int  # (reader, emitter) pairs of different functions
    new_step_changes: list[str]  # functions a new step like MODEL_STEP must change


def coupling(topology: Topology) -> Coupling:
    """Who must know what, read from the topology: consumers' filters and ``emits``."""
    consumes = {
        name: sorted({s for c in fn.consumers for s in c.events})
        for name, fn in topology.functions.items()
    }
    emitters: dict[str, set[str]] = defaultdict(set)
    for name, fn in topology.functions.items():
        for subject in fn.emits:
            emitters[subject].add(name)
    functions = {}
    for name, fn in topology.functions.items():
        reads_from = {e for s in consumes[name] for e in emitters.get(s) or {"client"}} - {name}
        read_by = {
            other
            for other in topology.functions
            if other != name and set(consumes[other]) & set(fn.emits)
        }
        functions[name] = FunctionCoupling(
            consumes=consumes[name],
            emits=list(fn.emits),
            subjects=len(set(consumes[name]) | set(fn.emits)),
            reads_from=sorted(reads_from),
            read_by=sorted(read_by),
        )
    return Coupling(
        functions=functions,
        subjects_known=sum(f.subjects for f in functions.values()),
        dependencies=sum(len(set(f.reads_from) - {"client"}) for f in functions.values()),
        new_step_changes=functions[MODEL_STEP].read_by if MODEL_STEP in functions else [],
    )


# --- one mode on a fresh server ---------------------------------------------


@dataclass
class Outage:
    function: str
    down_s: float
    orders: int  # published during the experiment
    affected: int  # unfinished when it was killed, or published while it was down
    finished_while_down: int
    finished_while_down_by_outcome: dict[str, int]
    progressed_while_down: int  # unfinished, but another function worked on them meanwhile
    waited: int  # finished only after the restart
    stranded: int  # messages delivered to the killed process, unacked: back after ack_wait
    unfinished: int
    duplicates: int  # terminal events stored beyond the first, per order
    recovery_s: float  # restart -> the last affected order finished
    max_latency_s: float


#: What is measured again on every --repeat: what the machine's other load disturbs.
SPEED = (
    "orders_per_s",
    "p50_ms",
    "p99_ms",
    "paced_p50_ms",
    "paced_p99_ms",
    "cpu_server_ms_per_order",
    "cpu_functions_ms_per_order",
    "machine_other_pct",
)


@dataclass
class ModeResult:
    mode: str
    orders: int
    completed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    duplicate_terminal_events: int = 0
    orders_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    paced_rate: float = 0.0
    paced_p50_ms: float = 0.0
    paced_p99_ms: float = 0.0
    hops_happy: float = 0.0  # causal chain orders.created -> orders.completed, median
    hops_cancelled: float = 0.0
    appended_per_order: dict[str, float] = field(default_factory=dict)  # stream -> msgs
    # The streams by role, as the table shows them: events, timers, retries, dead letters.
    stream_roles: list[str] = field(default_factory=list)
    events_per_order: float = 0.0  # ORDERS entries of the order that are not commands
    commands_per_order: float = 0.0
    state_writes_per_order: float = 0.0  # appended to the KV streams, all buckets
    deliveries_per_order: float = 0.0
    cpu_server_ms_per_order: float = 0.0
    cpu_functions_ms_per_order: float = 0.0
    cpu_by_function_ms_per_order: dict[str, float] = field(default_factory=dict)
    # The machine's CPU used by other programs during those orders, % of all CPUs:
    # above a few percent, the run shared the machine and its speed says little.
    machine_other_pct: float = 0.0
    #: each speed measure (SPEED) of every run of this mode (--repeat); the fields hold medians
    runs: dict[str, list[float]] = field(default_factory=dict)
    log_entries_median: float = 0.0
    log_entries_max: int = 0
    log_entries_by_path: dict[str, float] = field(default_factory=dict)
    streams_max: int = 0  # distinct streams holding one order's entries
    functions_median: float = 0.0  # distinct functions among them
    state_records_median: float = 0.0  # KV keys naming the order
    state_buckets: list[str] = field(default_factory=list)
    coupling: Coupling | None = None
    outages: list[Outage] = field(default_factory=list)
    processes_died: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)  # order id -> completed/cancelled
    reasons: dict[str, str] = field(default_factory=dict)  # order id -> why it was cancelled


def _median(values: Iterable[float]) -> float:
    found = list(values)
    return round(statistics.median(found), 1) if found else 0.0


Say = Callable[[str], None]


def _number(summary: dict[str, object], key: str) -> float:
    value = summary[key]
    assert isinstance(value, int | float), (key, value)
    return float(value)


async def _wait_ready(nc: Client, topology: Topology, timeout: float = 30.0) -> None:
    """Until every consumer of every function has had a pull request waiting."""
    js = nc.jetstream()
    pending = {(c.stream, c.durable) for fn in topology.functions.values() for c in fn.consumers}
    deadline = time.monotonic() + timeout
    while pending:
        for stream, durable in list(pending):
            with contextlib.suppress(Exception):
                if (await js.consumer_info(stream, durable)).num_waiting:
                    pending.discard((stream, durable))
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"functions not fetching after {timeout:g}s: {sorted(pending)}")
        await asyncio.sleep(0.05)


async def _appended(nc: Client, topology: Topology) -> dict[str, int]:
    """Last sequence of every stream and KV bucket: what was ever appended, deletes included."""
    js = nc.jetstream()
    names = [s.name for s in topology.streams] + [stream_name(b.name) for b in topology.buckets]
    return {name: (await js.stream_info(name)).state.last_seq for name in names}


async def _delivered(nc: Client, topology: Topology) -> int:
    js = nc.jetstream()
    total = 0
    for fn in topology.functions.values():
        for c in fn.consumers:
            total += (await js.consumer_info(c.stream, c.durable)).delivered.consumer_seq
    return total


def _cpu(server_pid: int, supervisor: Supervisor, functions: Iterable[str]) -> dict[str, float]:
    out = {name: sum(cpu_seconds(p) for p in supervisor.pids(name)) for name in functions}
    out["(server)"] = cpu_seconds(server_pid)
    out["(driver)"] = cpu_seconds(os.getpid())
    return out


async def _publish_paced(
    nc: Client, orders: list[OrderCreated], rate: float, tally: demo.Tally
) -> None:
    """Open loop: order i goes out at start + i/rate, whether or not the flow keeps up."""
    js = nc.jetstream()
    start = time.monotonic()
    sent: list[asyncio.Task[Any]] = []
    for i, order in enumerate(orders):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tally.published[order.order_id] = time.monotonic()
        sent.append(asyncio.create_task(js.publish(subjects.INGRESS, demo.payload(order))))
    await asyncio.gather(*sent)


async def _duplicates(nc: Client, topology: Topology, order_ids: Iterable[str]) -> int:
    """Terminal events the log holds beyond the first of each order.

    Counted in the log, not among the messages a subscriber saw: a repeated
    announcement (a redelivery, both halves of a join deciding) reaches core
    subscribers even though the stream refuses to store it a second time.
    """
    extra = 0
    for order_id in order_ids:
        stored = 0
        for kind in sorted(TERMINAL_SUBJECTS):
            filter_ = subjects.subject(kind, order_id)
            stored += len(await read_subject(nc, topology.events_stream, filter_))
        extra += max(0, stored - 1)
    return extra


async def _wait_finished(tally: demo.Tally, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.all_finished.wait(), timeout)


async def _paced(
    nc: Client, orders: list[OrderCreated], rate: float, timeout: float
) -> list[float]:
    tally = demo.Tally(expected=len(orders))
    async with tally.listening(nc):
        await _publish_paced(nc, orders, rate, tally)
        await _wait_finished(tally, timeout)
    return tally.latencies_ms()


def _hops(steps: list[trace_mod.Step]) -> int:
    """Events on the causal chain from ``orders.created`` to the order's terminal event."""
    by_kind: dict[str, trace_mod.Step] = {}
    for step in steps:
        by_kind.setdefault(step.kind, step)
    end = next((s for s in steps if s.kind in TERMINAL_SUBJECTS), None)
    hops = 0
    while end is not None and end.caused_by is not None and hops < len(steps):
        end, hops = by_kind.get(end.caused_by), hops + 1
    return hops


def _order_in(key: str, ids: set[str]) -> str | None:
    """The order a KV key names (``join.<ID>``, ``charge.charge-<ID>``), if any."""
    token = key.rsplit(".", 1)[-1]
    while token:
        if token in ids:
            return token
        token = token.partition("-")[2]
    return None


async def _explain(
    nc: Client, topology: Topology, paths: dict[str, str], result: ModeResult
) -> None:
    """What it takes to explain each order: log entries, streams, functions, state, hops."""
    ids = set(paths)
    # Each order's events, timers, retries and dead letters: filtered reads by its id.
    traces = await trace_mod.load(nc, topology, ids)
    events_stream = topology.events_stream
    # Of the order's entries in other streams (the orchestrator's timers), only those
    # some function consumed (a fired alarm) explain it. Pending alarms and their
    # withdrawals are rolled up and expire, so they explain nothing afterwards.
    inputs = {k for fn in topology.functions.values() for c in fn.consumers for k in c.events}
    # KV keys name an order inside a token (charge.charge-<ID>), which no subject
    # filter selects: each bucket is read once, for all the orders.
    records: dict[str, set[str]] = defaultdict(set)
    buckets_used: set[str] = set()
    for bucket in topology.buckets:
        for stored in await read_stream(nc, stream_name(bucket.name)):
            key = stored.subject.split(".", 2)[2]
            if (order_id := _order_in(key, ids)) is not None:
                records[order_id].add(f"{bucket.name}/{key}")
                buckets_used.add(bucket.name)

    entries: dict[str, int] = {}
    streams: list[int] = []
    functions: list[int] = []
    events: list[int] = []
    commands: list[int] = []
    hops_happy: list[int] = []
    hops_cancelled: list[int] = []
    for order_id, t in traces.items():
        own = [s for s in t.steps if topology.stream_of(s.subject) == events_stream]
        others = Counter(
            stream
            for s in t.steps
            if (stream := topology.stream_of(s.subject)) != events_stream and s.kind in inputs
        )
        entries[order_id] = len(own) + len(t.retries) + len(t.dead_letters) + others.total()
        touched = {events_stream} | set(others)
        if t.retries and topology.retry_log:
            touched.add(topology.retry_log.stream)
        if t.dead_letters:
            touched.add(topology.dead_letters.stream)
        streams.append(len(touched))
        functions.append(
            len({s.by for s in own if s.by != "client"} | {a.function for a in t.retries})
        )
        saga = sum(is_command(s.kind) for s in own)
        commands.append(saga)
        events.append(len(own) - saga)
        (hops_happy if t.outcome == "completed" else hops_cancelled).append(_hops(t.steps))
        if t.outcome:
            result.outcomes[order_id] = t.outcome
            end = next(s for s in t.steps if s.kind in TERMINAL_SUBJECTS)
            if isinstance(end.payload, dict) and end.payload.get("reason"):
                result.reasons[order_id] = str(end.payload["reason"])
    n = max(len(traces), 1)
    result.events_per_order = round(sum(events) / n, 2)
    result.commands_per_order = round(sum(commands) / n, 2)
    result.hops_happy = _median(hops_happy)
    result.hops_cancelled = _median(hops_cancelled)
    result.log_entries_median = _median(entries.values())
    result.log_entries_max = max(entries.values(), default=0)
    by_path: dict[str, list[int]] = defaultdict(list)
    for order_id, count in entries.items():
        by_path[paths[order_id]].append(count)
    result.log_entries_by_path = {p: _median(c) for p, c in sorted(by_path.items())}
    result.streams_max = max(streams, default=0)
    result.functions_median = _median(functions)
    result.state_records_median = _median(len(records[o]) for o in ids)
    result.state_buckets = sorted(buckets_used)


async def _outage(
    nc: Client,
    topology: Topology,
    supervisor: Supervisor,
    function: str,
    orders: list[OrderCreated],
    settings: Settings,
) -> Outage:
    """Steady orders; SIGKILL ``function`` after ``lead_s``, start it ``outage_s`` later."""
    tally = demo.Tally(expected=len(orders))
    js = nc.jetstream()
    count = sum(1 for c in supervisor.children if c.function == function)
    consumers = topology.functions[function].consumers
    async with tally.listening(nc):
        publisher = asyncio.create_task(_publish_paced(nc, orders, settings.rate, tally))
        await asyncio.sleep(settings.lead_s)
        # Nothing runs supervisor.watch() here, so nothing restarts it behind our back.
        for pid in supervisor.pids(function):
            os.kill(pid, signal.SIGKILL)
        for child in supervisor.children:
            if child.function == function and child.process is not None:
                await asyncio.to_thread(child.process.wait)
        killed, killed_wall = time.monotonic(), datetime.now(UTC)
        unfinished_at_kill = set(tally.published) - set(tally.finished)
        await asyncio.sleep(settings.outage_s)
        # Delivered to nobody alive and unacked: these wait out ack_wait.
        stranded = 0
        for spec in consumers:
            stranded += (await js.consumer_info(spec.stream, spec.durable)).num_ack_pending or 0
        # check() notes the dead child (a warning we caused: not shown), then starts it again.
        quiet = logging.getLogger("orderflow.ops.supervisor")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        deadline = time.monotonic() + settings.timeout
        try:
            while len(supervisor.pids(function)) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{function} did not start again in {settings.timeout:g}s")
                supervisor.check()
                await asyncio.sleep(0.02)
        finally:
            quiet.setLevel(level)
        restarted, restarted_wall = time.monotonic(), datetime.now(UTC)
        published_while_down = {
            oid for oid, at in tally.published.items() if killed <= at < restarted
        }
        await publisher
        await _wait_finished(tally, settings.timeout)

    affected = unfinished_at_kill | published_while_down
    done_down = {o for o in affected if o in tally.finished and tally.finished[o][1] < restarted}
    waited = {o for o in affected if o in tally.finished and o not in done_down}

    # Which of the rest moved while it was down: some function's work stored meanwhile.
    def worked(stored: Stored) -> bool:
        return (
            stored.kind.startswith(WORK_PREFIXES)
            and stored.headers.get(FUNCTION) != function
            and killed_wall <= stored.time < restarted_wall
        )

    moved = set()
    for order_id in sorted(affected - done_down):
        history = await read_subject(nc, topology.events_stream, subjects.of_order(order_id))
        if any(worked(stored) for stored in history):
            moved.add(order_id)
    latencies = tally.latencies_ms()
    return Outage(
        function=function,
        down_s=round(restarted - killed, 2),
        orders=len(orders),
        affected=len(affected),
        finished_while_down=len(done_down),
        finished_while_down_by_outcome=dict(Counter(tally.finished[o][0] for o in done_down)),
        progressed_while_down=len(moved - done_down),
        waited=len(waited),
        stranded=stranded,
        unfinished=len(affected - set(tally.finished)),
        duplicates=await _duplicates(nc, topology, tally.finished),
        recovery_s=round(
            max((tally.finished[o][1] for o in waited), default=restarted) - restarted, 2
        ),
        max_latency_s=round(max(latencies, default=0.0) / 1000, 2),
    )


async def _measure(
    url: str,
    topology: Topology,
    supervisor: Supervisor,
    server_pid: int,
    settings: Settings,
    run_id: str,
    say: Say,
    full: bool,
) -> ModeResult:
    mode = topology.mode
    result = ModeResult(mode=mode, orders=settings.orders)
    nc = await connect(url, name=f"orderflow-compare-{mode}")
    try:
        await _wait_ready(nc, topology)
        if settings.warmup:
            warm = demo.make_orders(settings.warmup, run_id=f"{run_id}-warmup", seed=7)
            await demo.run_orders(nc, warm, timeout=settings.timeout)
        await wait_until_quiet(nc, topology, timeout=settings.timeout, settle=0.2)

        say(f"{mode}: {settings.orders} orders at once")
        mixed = demo.make_orders(settings.orders, run_id=run_id, seed=settings.seed)
        appended, delivered = await _appended(nc, topology), await _delivered(nc, topology)
        cpu = _cpu(server_pid, supervisor, topology.functions)
        ticks = machine_ticks()  # until the end of the paced run: both measure speed
        summary = await demo.run_orders(nc, mixed, timeout=settings.timeout)
        await wait_until_quiet(nc, topology, timeout=settings.timeout, settle=0.2)
        cpu_after = _cpu(server_pid, supervisor, topology.functions)
        appended_after = await _appended(nc, topology)
        delivered_after = await _delivered(nc, topology)

        n = settings.orders or 1
        result.completed = int(_number(summary, "completed"))
        result.cancelled = int(_number(summary, "cancelled"))
        result.unfinished = int(_number(summary, "unfinished"))
        result.duplicate_terminal_events = await _duplicates(
            nc, topology, (o.order_id for _, o in mixed)
        )
        result.orders_per_s = _number(summary, "orders_per_s")
        result.p50_ms = _number(summary, "p50_ms")
        result.p99_ms = _number(summary, "p99_ms")
        result.appended_per_order = {
            name: round((appended_after[name] - appended[name]) / n, 2) for name in appended
        }
        kv = [stream_name(b.name) for b in topology.buckets]
        result.state_writes_per_order = round(sum(result.appended_per_order[k] for k in kv), 2)
        result.deliveries_per_order = round((delivered_after - delivered) / n, 2)
        used = {name: cpu_after[name] - cpu[name] for name in cpu}
        result.cpu_server_ms_per_order = round(used.pop("(server)") / n * 1000, 2)
        used.pop("(driver)")
        result.cpu_by_function_ms_per_order = {k: round(v / n * 1000, 2) for k, v in used.items()}
        result.cpu_functions_ms_per_order = round(sum(used.values()) / n * 1000, 2)

        if settings.paced:
            say(f"{mode}: {settings.paced} orders at {settings.rate:g}/s")
            paced = demo.make_orders(settings.paced, run_id=f"{run_id}-paced", seed=settings.seed)
            latencies = await _paced(nc, [o for _, o in paced], settings.rate, settings.timeout)
            result.unfinished += settings.paced - len(latencies)
            result.paced_rate = settings.rate
            result.paced_p50_ms = round(demo.percentile(latencies, 50), 1)
            result.paced_p99_ms = round(demo.percentile(latencies, 99), 1)
        ticks = [b - a for a, b in zip(ticks, machine_ticks(), strict=True)]
        total, idle = sum(ticks) or 1, ticks[3] + ticks[4]  # idle + iowait
        ours = sum(_cpu(server_pid, supervisor, topology.functions).values()) - sum(cpu.values())
        result.machine_other_pct = round(100 * max(0, total - idle - ours * CLOCK_TICKS) / total, 1)
        for name in SPEED:
            result.runs[name] = [getattr(result, name)]
        if not full:
            result.processes_died = len(supervisor.children) - len(supervisor.pids())
            return result

        say(f"{mode}: reading the log")
        await _explain(nc, topology, {o.order_id: p for p, o in mixed}, result)

        window = settings.lead_s + settings.outage_s + settings.tail_s
        steady = max(1, round(settings.rate * window))
        for function in settings.stop.get(mode, list(topology.functions)):
            say(f"{mode}: {function} down {settings.outage_s:g} s, {settings.rate:g} orders/s")
            await wait_until_quiet(nc, topology, timeout=settings.timeout, settle=0.2)
            orders = demo.make_orders(steady, run_id=f"{run_id}-{function}", seed=settings.seed)
            result.outages.append(
                await _outage(nc, topology, supervisor, function, [o for _, o in orders], settings)
            )
        expected = len(supervisor.children)
        result.processes_died = expected - len(supervisor.pids())
    finally:
        await nc.close()
    return result


def run_mode(
    config_path: Path, mode: str, settings: Settings, run_id: str, say: Say, full: bool = True
) -> ModeResult:
    """One mode on its own fresh server; every process is stopped on the way out.

    Not ``full``: only the speed measures (SPEED), for another repetition.
    """
    topology = config_mod.load(config_path, mode)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix=f"orderflow-compare-{mode}-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        try:
            assert server.process is not None
            asyncio.run(provision_at(server.url, topology, config_path.parent))
            supervisor = Supervisor(
                server.url,
                config_path,
                dict.fromkeys(topology.functions, 1),
                log_dir=Path(tmp) / "logs",
                mode=mode,
            )
            supervisor.start()
            try:
                result = asyncio.run(
                    _measure(server.url, topology, supervisor, server.process.pid, settings,
                             run_id, say, full)
                )  # fmt: skip
            finally:
                supervisor.stop()
        finally:
            server.stop()
    result.coupling = coupling(topology)
    roles = [topology.events_stream, topology.timers_stream]
    roles.append(topology.retry_log.stream if topology.retry_log else None)
    result.stream_roles = [n for n in roles if n is not None] + [topology.dead_letters.stream]
    return result


# --- both modes --------------------------------------------------------------


@dataclass
class Comparison:
    machine: dict[str, object]
    settings: Settings
    modes: dict[str, ModeResult]
    #: order ids whose outcome is not the same in every mode (or missing in one)
    differences: list[str]
    #: cancelled in both, for reasons worded differently: order id -> reason per mode
    reasons_differ: dict[str, list[str]]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not self.differences and all(
            not m.unfinished
            and not m.duplicate_terminal_events
            and not m.processes_died
            and not any(o.unfinished or o.duplicates for o in m.outages)
            for m in self.modes.values()
        )


def stops(config_path: Path, names: str | None) -> dict[str, list[str]]:
    """``--stop payment,orchestrator`` -> the functions to stop in each mode (default: all)."""
    wired: dict[str, list[str]] = {
        mode: list(config_mod.load(config_path, mode).functions) for mode in MODES
    }
    if not names:
        return wired
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if not any(n in fns for fns in wired.values())]
    if unknown:
        known = sorted({f for fns in wired.values() for f in fns})
        raise config_mod.ConfigError(
            f"--stop {', '.join(unknown)}: no such function (functions: {', '.join(known)})"
        )
    return {mode: [n for n in wanted if n in fns] for mode, fns in wired.items()}


def machine() -> dict[str, object]:
    model = cpu_model()
    return {"cpus": os.cpu_count(), "cpu": model, "load_before": list(os.getloadavg())}


def run(config_path: Path, settings: Settings, progress: bool = False) -> Comparison:
    """Both modes, one after the other, each on a fresh server, on the same orders."""
    started = time.monotonic()

    def say(line: str) -> None:
        if progress:
            print(f"  {time.monotonic() - started:5.1f}s  {line}", file=sys.stderr, flush=True)

    info = machine()
    run_id = f"cmp-{os.getpid() % 100000:05d}"
    modes: dict[str, ModeResult] = {
        mode: run_mode(config_path, mode, settings, run_id, say) for mode in MODES
    }
    for again in range(1, settings.repeat):
        for mode, result in modes.items():  # interleaved: a change in load hits both
            say(f"repetition {again + 1} of {settings.repeat}")
            extra = run_mode(config_path, mode, settings, f"{run_id}-{again}", say, full=False)
            result.unfinished += extra.unfinished
            result.duplicate_terminal_events += extra.duplicate_terminal_events
            result.processes_died += extra.processes_died
            for name in SPEED:
                result.runs[name] += extra.runs[name]
    for result in modes.values():
        for name in SPEED:
            setattr(result, name, round(statistics.median(result.runs[name]), 2))
    info["load_after"] = list(os.getloadavg())
    outcomes = [m.outcomes for m in modes.values()]
    every = set().union(*outcomes)
    differences = sorted(o for o in every if len({oc.get(o) for oc in outcomes}) > 1)
    reasons = [m.reasons for m in modes.values()]
    other_reasons = {
        o: [r.get(o, "") for r in reasons]
        for o in sorted(set().union(*reasons))
        if len({r.get(o) for r in reasons}) > 1
    }
    elapsed = round(time.monotonic() - started, 1)
    return Comparison(info, settings, modes, differences, other_reasons, elapsed)


def as_json(comparison: Comparison) -> dict[str, Any]:
    out = asdict(comparison)
    out["ok"] = comparison.ok
    return out


# --- the table ---------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"x{b / a:.2f}" if a and b else ""


def _announcer(result: ModeResult) -> str | None:
    assert result.coupling is not None
    for name, fn in result.coupling.functions.items():
        if "orders.completed" in fn.emits:
            return name
    return None


def _outage_rows(modes: list[ModeResult], settings: Settings) -> list[tuple[str, ...]]:
    """Three rows per stopped function; the two functions that announce outcomes share them."""
    by_role: dict[str, dict[str, Outage]] = defaultdict(dict)
    for m in modes:
        for outage in m.outages:
            role = "announcer" if outage.function == _announcer(m) else outage.function
            by_role[role][m.mode] = outage
    rows: list[tuple[str, ...]] = []
    for role, outages in by_role.items():
        if role == "announcer":
            names = " / ".join(o.function for o in outages.values())
            head = f"stop {names} (announces outcomes)"
        else:
            head = f"stop {role}"
        rows.append((f"{head} {settings.outage_s:g} s:", "", "", ""))

        def cell(fmt: Callable[[Outage], str], mode: str, outages: dict[str, Outage]) -> str:
            found = outages.get(mode)
            return fmt(found) if found else "-"

        def finished(o: Outage) -> str:
            kinds = ", ".join(
                f"{n} {k}" for k, n in sorted(o.finished_while_down_by_outcome.items())
            )
            return f"{o.finished_while_down} of {o.affected}" + (f" ({kinds})" if kinds else "")

        def waited(o: Outage) -> str:
            lost = f", {o.unfinished} NEVER" if o.unfinished else ""
            return f"{o.waited} ({o.progressed_while_down}){lost}"

        def recovery(o: Outage) -> str:
            return f"{o.recovery_s:.1f} s / {o.max_latency_s:.1f} s"

        def stranded(o: Outage) -> str:
            return f"{o.stranded} msgs"

        for label, fmt in (
            ("  orders finished while down", finished),
            ("  waited for the restart (moved meanwhile)", waited),
            ("  backlog cleared after restart / max latency", recovery),
            ("  held unacked by the killed process", stranded),
        ):
            chor, orch = cell(fmt, "choreography", outages), cell(fmt, "orchestration", outages)
            rows.append((label, chor, orch, ""))
    return rows


def rows(comparison: Comparison) -> list[tuple[str, ...]]:
    c, o = comparison.modes["choreography"], comparison.modes["orchestration"]
    s = comparison.settings
    assert c.coupling is not None and o.coupling is not None

    def both(value: Callable[[ModeResult], object]) -> tuple[str, str]:
        return str(value(c)), str(value(o))

    def spread(m: ModeResult, name: str) -> str:
        """The median, and with --repeat the lowest and highest run."""
        runs = m.runs.get(name, [])
        value = f"{getattr(m, name):.0f}"
        return value + (f" ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else "")

    def busiest(m: ModeResult) -> str:
        name = max(m.cpu_by_function_ms_per_order, key=lambda k: m.cpu_by_function_ms_per_order[k])
        most = m.cpu_by_function_ms_per_order[name]
        return f"{m.cpu_functions_ms_per_order:.1f} ({name} {most:.1f})"

    def streams(m: ModeResult) -> str:
        a = m.appended_per_order
        return " / ".join(f"{a.get(n, 0.0):g}" for n in c.stream_roles)

    dead_letters = c.stream_roles[-1] if c.stream_roles else ""
    stream_names = "/".join("DLQ" if n == dead_letters else n for n in c.stream_roles)

    def subjects(m: ModeResult) -> str:
        assert m.coupling is not None
        fns = m.coupling.functions
        most = max(fns, key=lambda k: fns[k].subjects)
        return f"{m.coupling.subjects_known} ({most} {fns[most].subjects})"

    def dependencies(m: ModeResult) -> str:
        assert m.coupling is not None
        return str(m.coupling.dependencies)

    def new_step(m: ModeResult) -> str:
        assert m.coupling is not None
        return ", ".join(m.coupling.new_step_changes) or "none"

    table: list[tuple[str, ...]] = [
        (f"orders/s, {s.orders} orders at once", *both(lambda m: spread(m, "orders_per_s")),
         _ratio(c.orders_per_s, o.orders_per_s)),
        ("  latency p50 / p99, ms", *both(lambda m: f"{m.p50_ms:.0f} / {m.p99_ms:.0f}"),
         "mostly queueing"),
        ("  CPU used by other programs meanwhile", *both(lambda m: f"{m.machine_other_pct:g} %"),
         "above ~15 %: noise"),
        (f"latency p50 / p99 at {s.rate:g} orders/s, ms",
         *both(lambda m: f"{spread(m, 'paced_p50_ms')} / {m.paced_p99_ms:.0f}"),
         _ratio(c.paced_p50_ms, o.paced_p50_ms) + " p50"),
        ("causal hops to completed / cancelled",
         *both(lambda m: f"{m.hops_happy:g} / {m.hops_cancelled:g}"), "median"),
        ("events + commands per order", *both(
            lambda m: f"{m.events_per_order:g} + {m.commands_per_order:g}"), ""),
        (f"appended/order {stream_names}", *both(streams), ""),
        ("state writes per order (KV appends)", *both(lambda m: m.state_writes_per_order),
         _ratio(c.state_writes_per_order, o.state_writes_per_order)),
        ("consumer deliveries per order", *both(lambda m: m.deliveries_per_order),
         _ratio(c.deliveries_per_order, o.deliveries_per_order)),
        ("server CPU ms per order", *both(lambda m: m.cpu_server_ms_per_order),
         _ratio(c.cpu_server_ms_per_order, o.cpu_server_ms_per_order)),
        ("function CPU ms per order (most)", *both(busiest),
         _ratio(c.cpu_functions_ms_per_order, o.cpu_functions_ms_per_order)),
        ("subjects known, all functions (most)", *both(subjects), "consumed + emitted"),
        ("function-to-function dependencies", *both(dependencies), "A reads B's events"),
        (f"a new step like {MODEL_STEP} changes", *both(new_step), "who reads its outcome"),
        ("log entries per order, median (max)",
         *both(lambda m: f"{m.log_entries_median:g} ({m.log_entries_max})"), "with its id"),
        ("  streams (max) / functions (median)",
         *both(lambda m: f"{m.streams_max} / {m.functions_median:g}"), ""),
        ("  KV records naming it (median)", *both(lambda m: f"{m.state_records_median:g}"),
         ""),
    ]  # fmt: skip
    return table + _outage_rows([c, o], s)


def render(comparison: Comparison) -> str:
    table = [("measure", "choreography", "orchestration", "orch. vs chor."), *rows(comparison)]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = []
    for i, r in enumerate(table):
        lines.append(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
        )
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    s, m = comparison.settings, comparison.machine
    load = m.get("load_before")
    lines += [
        "",
        f"{m['cpus']} x {m['cpu']}; load average before the run "
        + (f"{load[0]:.2f}" if isinstance(load, list) else "?"),
        f"{s.orders} orders at once (seed {s.seed}), {s.paced} at {s.rate:g}/s, then each "
        f"function SIGKILLed for {s.outage_s:g} s under {s.rate:g} orders/s; "
        f"{comparison.elapsed_s:g} s in all."
        + (
            f" Speed and CPU rows: median of {s.repeat} runs per mode, interleaved, "
            "(lowest-highest)."
            if s.repeat > 1
            else ""
        ),
        "Outage rows count the orders unfinished at the kill or published while it was down; "
        "'moved meanwhile': another function stored work for the order (a payments, stock or "
        "delivery event) while it was down. Messages the killed process held come back after "
        "the consumer's ack_wait.",
    ]
    if comparison.reasons_differ:
        order_id, said = next(iter(comparison.reasons_differ.items()))
        lines.append(
            f"{len(comparison.reasons_differ)} orders were cancelled in both modes for reasons "
            f"told differently, e.g. {order_id}: " + " | ".join(repr(r) for r in said)
        )
    if comparison.differences:
        lines.append(f"OUTCOMES DIFFER for {len(comparison.differences)} orders, e.g. "
                     f"{', '.join(comparison.differences[:5])}")  # fmt: skip
    if not comparison.ok:
        lines.append("NOT OK: unfinished or doubled orders, or a process died (see --json)")
    return "\n".join(lines)
