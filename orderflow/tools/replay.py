"""Replay a recording and compare: does the code still do what the log says it did?

A recording's *external inputs* are the ``orders.created`` messages that no
function emitted (clients published them). Replaying feeds only those to the
functions, fresh, and compares everything the functions emit with what the
recording holds, order by order: the same subjects, the same payloads. Ids
that matter are derived, not drawn (charge ids, tracking ids, message ids),
and headers and times are left out of the comparison, so an unchanged flow
replays identically and a changed handler shows up as a diff. This is to
choreography what Temporal's replayer is to a workflow.

Both sides are compared at the current version of each kind's schema: a
recording made with older versions is upgraded by the upcasters
(``functions/upcasters.py``) before the comparison, as its inputs are before
the handlers see them, so an old recording still replays, and a change of
schema without its upcaster shows up as a diff too.

Two ways:

* :func:`replay_offline` runs the handlers in this process over memory
  stores, no server: they are pure, so this is fast and needs nothing;
* :func:`replay_live` publishes the inputs to a real system (a fresh embedded
  server, or ``--into``) with every function in its own process, and reads
  what they emitted back from the log.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgspec
from nats.aio.client import Client

from functions.errors import Permanent
from functions.events import (
    AlarmCleared,
    AnyOrderId,
    Command,
    Event,
    StepTimedOut,
    event_id,
    subject_of,
)
from functions.history import E, MemoryHistory
from functions.state import MemoryStore, Store
from orderflow import subjects
from orderflow.config import FunctionSpec, Topology, load_inventory
from orderflow.ops.provision import provision, seed_levels
from orderflow.ops.server import EmbeddedServer
from orderflow.runtime import decoding, pipeline
from orderflow.runtime.bindings import build_handler
from orderflow.runtime.context import FUNCTION, SCHEMA_VERSION
from orderflow.runtime.emit import check_emits
from orderflow.tools.recording import Recorded
from orderflow.tools.streamlog import read_stream

log = logging.getLogger("orderflow.tools.replay")

_encode = msgspec.json.Encoder().encode

#: order id -> what the functions emitted for it, one canonical line per event
Outcomes = dict[str, list[str]]
#: An emitted event as stored: its kind, payload and headers (its schema version).
Emitted = tuple[str, bytes, Mapping[str, str]]


def external_inputs(records: Iterable[Recorded]) -> list[Recorded]:
    return [
        r
        for r in records
        if subjects.kind_of(r.subject) == subjects.INGRESS and FUNCTION not in r.headers
    ]


def _line(kind: str, data: bytes, headers: Mapping[str, str]) -> str:
    # At the current version of the kind's schema; canonical: keys sorted, so a
    # field order change is not a behaviour change.
    payload = decoding.as_current(kind, data, decoding.version_in(headers))
    return f"{kind} {msgspec.json.encode(payload, order='sorted').decode()}"


def outcomes(emitted: Iterable[Emitted]) -> Outcomes:
    """Group emitted events (kind, payload, headers) by order; within an order, sort
    (arrival order is not behaviour)."""
    out: dict[str, list[str]] = defaultdict(list)
    for kind, data, headers in emitted:
        order_id = msgspec.json.decode(data, type=AnyOrderId).order_id
        out[order_id].append(_line(kind, data, headers))
    return {order_id: sorted(lines) for order_id, lines in out.items()}


def recorded_outcomes(records: Iterable[Recorded]) -> Outcomes:
    return outcomes(
        (subjects.kind_of(r.subject), r.data, r.headers) for r in records if FUNCTION in r.headers
    )


@dataclass
class Comparison:
    orders: int
    same: int
    diffs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.diffs

    def render(self) -> str:
        head = f"{self.orders} orders replayed: {self.same} identical, {len(self.diffs)} differ"
        body = [
            f"\norder {order_id}:\n" + "\n".join(lines) for order_id, lines in self.diffs.items()
        ]
        return head + "".join(body)


def compare(recorded: Outcomes, replayed: Outcomes) -> Comparison:
    orders = sorted(set(recorded) | set(replayed))
    result = Comparison(orders=len(orders), same=0)
    for order_id in orders:
        want, got = recorded.get(order_id, []), replayed.get(order_id, [])
        if want == got:
            result.same += 1
            continue
        result.diffs[order_id] = list(
            difflib.unified_diff(want, got, "recorded", "replayed", lineterm="", n=1)
        )
    return result


# --- offline -------------------------------------------------------------------


@dataclass
class OfflineResult:
    emitted: list[Emitted]
    dead_letters: list[tuple[str, str, str]]  # (function, subject, reason)


class ReplayHistory:
    """The offline flow's history as one handled message sees it: the same rules as
    ``orderflow.runtime.history.MessageHistory`` (reads and appends as streams.yaml declares)."""

    def __init__(
        self,
        log: MemoryHistory,
        function: str,
        spec: FunctionSpec,
        append: Callable[[Event], None],
    ) -> None:
        self.log = log
        self.function = function
        self.reads = frozenset(spec.reads)
        self.emits = spec.emits
        self._append = append

    async def last(self, order_id: str, kind: type[E]) -> E | None:
        if subject_of(kind) not in self.reads:
            raise Permanent(f"{self.function} read {subject_of(kind)}, not in its reads")
        return await self.log.last(order_id, kind)

    async def append(self, event: Event) -> None:
        check_emits(self.function, self.emits, [event])
        self._append(event)


async def run_offline(
    inputs: list[Recorded], topology: Topology, base: Path, attempts: int = 20
) -> OfflineResult:
    """The flow in one process: every function, memory stores, a queue as the stream.

    Each input is followed to the end before the next one starts, so orders
    meet the shelves in the order they were recorded. A handler that fails
    transiently (a flaky card) is tried again later, as the runner would.
    Every message goes through the runner's own steps: decoding and limits,
    the emits and reads declared in streams.yaml, one event per order and kind.
    """
    stores: dict[str, Store] = {b.name: MemoryStore() for b in topology.buckets}
    if topology.inventory is not None:
        stock = load_inventory(base / topology.inventory.file)
        await seed_levels(stores[topology.inventory.bucket], stock)
    # Consumers only: requests (a cancellation) are not in a recording's inputs.
    handlers = {
        name: build_handler(topology, name, stores.__getitem__)
        for name, fn in topology.functions.items()
        if fn.consumers
    }

    def readers(kind: str) -> list[str]:
        return [
            name
            for name, fn in topology.functions.items()
            if any(kind in c.events for c in fn.consumers)
        ]

    result = OfflineResult(emitted=[], dead_letters=[])
    log = MemoryHistory()  # the events stream: one event per order and kind
    seen_ids: set[str] = set()  # the stream's duplicate window, for commands
    max_payload = topology.dead_letters.max_payload
    #: (function, subject, payload, headers, attempt): a delivery still to make
    Queue = deque[tuple[str, str, bytes, Mapping[str, str], int]]

    def publish(event: Event, message_id: str | None, queue: Queue) -> None:
        if isinstance(event, StepTimedOut | AlarmCleared):
            # The orchestrator's alarms are time's doing, and no time passes
            # here: none fires (nor is it in the recorded stream, ORDERS).
            return
        if isinstance(event, Command) or message_id is not None:
            key = message_id or event_id(event)
            if key in seen_ids:
                return
            seen_ids.add(key)
        elif not log.record(event):
            return  # the order has this kind already: the stream refuses a second
        kind, data = subject_of(type(event)), _encode(event)
        headers = {SCHEMA_VERSION: str(event.schema_version)}  # as the emitter's
        result.emitted.append((kind, data, headers))
        subject = subjects.subject(kind, event.order_id)
        queue.extend((name, subject, data, headers, 1) for name in readers(kind))

    for sequence, record in enumerate(inputs, start=1):
        kind = subjects.kind_of(record.subject)
        queue: Queue = deque(
            (name, record.subject, record.data, record.headers, 1) for name in readers(kind)
        )
        while queue:
            name, subject, data, headers, attempt = queue.popleft()
            kind = subjects.kind_of(subject)
            spec = topology.functions[name]
            # The worker's own steps (orderflow.runtime.pipeline); a transient
            # failure is tried again later, up to ``attempts``, as redelivery would.
            admitted = pipeline.admit(spec, subject, data, headers, attempt, attempts,
                                      topology.limits, max_payload)  # fmt: skip
            outcome: pipeline.Outcome
            if isinstance(admitted, pipeline.DeadLetter):
                outcome = admitted
            else:
                history = ReplayHistory(
                    log, name, spec, partial(publish, message_id=None, queue=queue)
                )
                outcome = await pipeline.handle(
                    name, spec, handlers[name], admitted, history, attempt, attempts
                )
            if isinstance(outcome, pipeline.DeadLetter):
                if outcome.rejection is not None:
                    publish(outcome.rejection, f"orders.rejected:input:{sequence}", queue)
                result.dead_letters.append((name, kind, outcome.reason))
            elif isinstance(outcome, pipeline.Again):
                queue.append((name, subject, data, headers, attempt + 1))
            else:
                for out in outcome.events:
                    publish(out, None, queue)
    return result


async def replay_offline(records: list[Recorded], topology: Topology, base: Path) -> Comparison:
    result = await run_offline(external_inputs(records), topology, base)
    return compare(recorded_outcomes(records), outcomes(result.emitted))


# --- live --------------------------------------------------------------------


async def wait_until_quiet(
    nc: Client, topology: Topology, timeout: float = 60.0, settle: float = 0.5
) -> None:
    """Until no consumer has anything pending or unacked, twice ``settle`` apart."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    calm = 0
    while calm < 2:
        busy = {}
        for name, fn in topology.functions.items():
            for consumer in fn.consumers:
                info = await js.consumer_info(consumer.stream, consumer.durable)
                if info.num_pending or info.num_ack_pending:
                    busy[name] = (info.num_pending, info.num_ack_pending)
        calm = 0 if busy else calm + 1
        if busy and time.monotonic() > deadline:
            raise TimeoutError(f"consumers still busy after {timeout}s: {busy}")
        await asyncio.sleep(settle if not busy else 0.1)


async def replay_live(
    records: list[Recorded],
    topology: Topology,
    config: Path,
    into: str | None = None,
    original_speed: bool = False,
    timeout: float = 120.0,
    progress: bool = False,
) -> Comparison:
    from orderflow.ops.supervisor import Supervisor
    from orderflow.runtime.connect import connect

    inputs = external_inputs(records)
    with tempfile.TemporaryDirectory(prefix="orderflow-replay-") as tmp:
        server = None
        if into is None:
            server = EmbeddedServer(Path(tmp) / "nats")
            server.start()
        url = into or (server.url if server else "")
        counts = dict.fromkeys(topology.functions, 1)
        supervisor = Supervisor(url, config, counts, log_dir=Path(tmp) / "logs", mode=topology.mode)
        nc = await connect(url, name="orderflow-replay")
        try:
            await provision(nc, topology, config.parent)
            supervisor.start()
            stop = asyncio.Event()
            watcher = asyncio.create_task(supervisor.watch(stop))
            events = topology.events_stream
            first_seq = (await nc.jetstream().stream_info(events)).state.last_seq + 1
            await _publish(nc, inputs, original_speed, progress)
            if progress:
                print("  waiting for the functions to settle...", file=sys.stderr)
            await wait_until_quiet(nc, topology, timeout=timeout)
            stored = await read_stream(nc, events, from_seq=first_seq)
            stop.set()
            await watcher
        finally:
            await nc.close()
            await asyncio.to_thread(supervisor.stop)
            if server is not None:
                server.stop()
    replayed = outcomes((s.kind, s.data, s.headers) for s in stored if FUNCTION in s.headers)
    return compare(recorded_outcomes(records), replayed)


async def _publish(
    nc: Client, inputs: list[Recorded], original_speed: bool, progress: bool
) -> None:
    js = nc.jetstream()
    start = time.monotonic()
    origin = inputs[0].timestamp if inputs else 0.0
    for done, record in enumerate(inputs, start=1):
        if original_speed:
            await asyncio.sleep(max(0.0, record.timestamp - origin - (time.monotonic() - start)))
        await js.publish(record.subject, record.data, headers=record.headers or None)
        if progress and (done % 50 == 0 or done == len(inputs)):
            print(f"\r  published {done}/{len(inputs)} inputs", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
