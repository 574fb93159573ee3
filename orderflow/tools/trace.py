"""Trace an order from the log itself: what happened, who did it, and who owes the next step.

Choreography has no central record of a flow, but the log is one: every event
names its emitter, its cause and its order (``orderflow.runtime.context``), failed
attempts are noted in the retry log and given-up messages in the dead
letters. This module reads all three for one order and lays them out as a
causal timeline. When the order is not finished, :func:`waiting_on` says what
the flow expects next and which function owes it, and the consumer of that
function says whether anyone is there to do it.

Nothing here scans: every message of an order is filed under its id
(``orderflow.subjects``), so reading one order is a filtered read per stream
(its events, its alarms, its retries, its dead letters) that the server's
subject index answers, plus the payload-only ``orders.created`` it started
from, fetched by the position its first reactions name as their cause. The
cost is the order's own size, whatever the history's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import msgspec
from nats.aio.client import Client

from functions.events import REQUEST_TYPES, TERMINAL_SUBJECTS
from orderflow import subjects
from orderflow.config import FunctionSpec, Topology
from orderflow.ops import interventions
from orderflow.runtime import context as ctx
from orderflow.runtime import deadletter as dl
from orderflow.runtime.decoding import order_of
from orderflow.tools.status import ask_all
from orderflow.tools.streamlog import Stored, read_at, read_subject


@dataclass(frozen=True)
class Step:
    """An event of the order, placed in time and in its causal chain."""

    sequence: int
    time: datetime
    subject: str
    kind: str  # the event's kind, e.g. payments.succeeded
    by: str  # the emitting function, or "client"
    event_id: str
    caused_by: str | None  # the subject of the cause
    hop_ms: float | None  # since the cause was logged
    payload: object


@dataclass(frozen=True)
class Aside:
    """Something that happened to the order besides its events: a retry, a dead letter."""

    time: datetime
    kind: str  # "retry" | "dead letter"
    function: str
    subject: str
    detail: str
    fields: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Owed:
    function: str
    what: str
    since: datetime
    consumer: dict[str, int] = field(default_factory=dict)
    #: Dead letters of the owing function on a message that made the step due:
    #: what holds the order (a redrive of one resumes it).
    held_by: list[Aside] = field(default_factory=list)
    #: The owing function is paused ("PAUSED since ... until ..."), or "".
    paused: str = ""


@dataclass
class Trace:
    order_id: str
    steps: list[Step]
    retries: list[Aside]
    dead_letters: list[Aside]
    owed: list[Owed]
    #: What operators did meanwhile: to the order (cancel requests and their answers),
    #: and to functions while the order was open (pause, resume).
    interventions: list[Aside] = field(default_factory=list)

    @property
    def outcome(self) -> str | None:
        done = [s.kind for s in self.steps if s.kind in TERMINAL_SUBJECTS | {"orders.rejected"}]
        return done[0].rsplit(".", 1)[1] if done else None


#: Orders read at the same time by one ``load``.
READ_TOGETHER = 32


# --- what should happen next -------------------------------------------------


Owing = list[tuple[str, str, set[str]]]


def waiting_on(logged: Sequence[str], topology: Topology) -> Owing:
    """Pure: (function, what it owes, the subjects that made it due) for an unfinished order.

    ``logged``: the subjects of the order's messages, in log order.
    """
    if set(logged) & (TERMINAL_SUBJECTS | {"orders.rejected"}):
        return []
    if topology.mode == "orchestration":
        return _saga_waiting_on(logged)
    return _owed(set(logged), topology)


def _owed(logged: set[str], topology: Topology) -> Owing:
    """The choreography read backwards from streams.yaml's ``owes``: every rule whose
    ``after`` is all in the log and none of whose ``then`` or ``unless`` is."""
    return [
        (
            name,
            " or ".join(rule.then),
            {k for item in rule.after for k in item.split("|") if k in logged},
        )
        for name, fn in topology.functions.items()
        for rule in fn.owes
        if rule.owing(logged)
    ]


def _saga_waiting_on(logged: Sequence[str]) -> Owing:
    """A saga does one thing at a time: the last command awaits its function's answer;
    anything else awaits the orchestrator's next command. Fired deadlines and
    alarms change neither: a command sent again is logged as one, and one that
    is not (the step waits) is still owed by its function."""
    timers = (subjects.ALARM, "saga.timeout")
    last = next((kind for kind in reversed(logged) if kind not in timers), logged[-1])
    command = last.split(".")
    if len(command) == 3 and command[0] == "saga":  # saga.<function>.<verb>
        return [(command[1], f"its answer to {last}", {last})]
    return [("orchestrator", "the next command, or the terminal event", {last})]


# --- reading the log ---------------------------------------------------------


def _order_of(stored: Stored) -> str | None:
    return stored.headers.get(ctx.CORRELATION_ID) or order_of(stored.subject, stored.data)


def _payload(data: bytes) -> object:
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return data.decode(errors="replace")


def steps_of(events: list[Stored], stream: str) -> list[Step]:
    by_id: dict[str, Stored] = {}
    steps = []
    for e in events:
        event_id = ctx.input_event_id(e.headers, stream, e.sequence)
        by_id[event_id] = e
        cause_id = e.headers.get(ctx.CAUSATION_ID, "")
        cause = by_id.get(cause_id)
        # A request is no event of the log: named by its subject (orders.cancel:<request>).
        head = cause_id.partition(":")[0]
        asked = head if cause is None and head in REQUEST_TYPES else None
        steps.append(
            Step(
                sequence=e.sequence,
                time=e.time,
                subject=e.subject,
                kind=e.kind,
                by=e.headers.get(ctx.FUNCTION, "client"),
                event_id=event_id,
                caused_by=cause.kind if cause else asked,
                hop_ms=(e.time - cause.time).total_seconds() * 1000 if cause else None,
                payload=_payload(e.data),
            )
        )
    return steps


async def _consumer_state(nc: Client, topology: Topology, function: str) -> dict[str, int]:
    js = nc.jetstream()
    state = {"pending": 0, "unacked": 0, "redelivered": 0, "fetching": 0, "paused": 0}
    for consumer in topology.functions[function].consumers:
        info = await js.consumer_info(consumer.stream, consumer.durable)
        state["paused"] |= bool(info.paused)
        state["pending"] += info.num_pending or 0
        state["unacked"] += info.num_ack_pending or 0
        state["redelivered"] += info.num_redelivered or 0
        state["fetching"] += info.num_waiting or 0  # pull requests outstanding
    return state


async def order_messages(nc: Client, topology: Topology, order_id: str) -> list[Stored]:
    """Everything the events stream (and the timers stream) holds about one order, in time
    order: one filtered read each, plus the payload-only ingress its reactions name."""
    stream = topology.events_stream
    found = await read_subject(nc, stream, subjects.of_order(order_id))
    if topology.timers_stream is not None and topology.mode == "orchestration":
        # The orchestrator's fired deadlines: the cause of a command sent again.
        found += await read_subject(
            nc, topology.timers_stream, subjects.of_order(order_id, subjects.TIMER)
        )
    ingress = {
        seq for s in found if (seq := _position(s.headers.get(ctx.CAUSATION_ID, ""), stream))
    }
    ingress -= {s.sequence for s in found}
    for sequence in sorted(ingress):
        stored = await read_at(nc, stream, sequence)
        if stored is not None and _order_of(stored) == order_id:
            found.append(stored)
    if not any(s.kind == subjects.INGRESS for s in found):
        # Nothing has reacted to it yet (its readers are down or behind): a
        # payload-only orders.created is then still past their ack floors.
        found += [
            s for s in await _unsettled(nc, topology, subjects.INGRESS) if _order_of(s) == order_id
        ][:1]
    found.sort(key=lambda stored: stored.time)
    return found


async def _unsettled(nc: Client, topology: Topology, kind: str | None = None) -> list[Stored]:
    """Every message some consumer has not settled yet (past its ack floor), of ``kind``
    or of any kind it reads; each consumer's share is one filtered read per kind."""
    js = nc.jetstream()
    found: dict[tuple[str, int], Stored] = {}
    for fn in topology.functions.values():
        for consumer in fn.consumers:
            kinds = sorted(k for k in consumer.events if kind is None or k == kind)
            if not kinds:
                continue
            info = await js.consumer_info(consumer.stream, consumer.durable)
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            for pattern in (p for k in kinds for p in subjects.filters(k)):
                for stored in await read_subject(nc, consumer.stream, pattern, floor + 1):
                    found[(consumer.stream, stored.sequence)] = stored
    return list(found.values())


def _position(event_id: str, stream: str) -> int | None:
    """The sequence in ``stream`` an id names, when it is a position (``ORDERS:17``)."""
    head, _, tail = event_id.partition(":")
    return int(tail) if head == stream and tail.isdigit() else None


async def _asides(nc: Client, topology: Topology, order_id: str) -> tuple[list[Aside], list[Aside]]:
    """The order's failed attempts and dead letters, each one filtered read."""
    retries = []
    if topology.retry_log is not None:
        log = topology.retry_log
        for stored in await read_subject(
            nc, log.stream, subjects.retry_note(log.subject_prefix, order_id, ">")
        ):
            note = _payload(stored.data)
            if isinstance(note, dict):
                detail = (
                    f"attempt {note.get('attempt')} failed, again in {note.get('delay_s')} s: "
                    f"{note.get('error')}"
                )
                retries.append(
                    Aside(stored.time, "retry", str(note.get("function")),
                          subjects.kind_of(str(note.get("subject"))), detail, note)
                )  # fmt: skip
    dead = []
    letters = topology.dead_letters
    for stored in await read_subject(
        nc, letters.stream, subjects.dead_letter(letters.subject_prefix, order_id, ">")
    ):
        h = stored.headers
        detail = f"dead letter {stored.sequence}: {h.get(dl.REASON, '')}"
        dead.append(
            Aside(stored.time, "dead letter", h.get(dl.FUNCTION, "?"),
                  subjects.kind_of(h.get(dl.SUBJECT, "?")), detail, {"id": stored.sequence})
        )  # fmt: skip
    return retries, dead


async def _interventions(nc: Client, topology: Topology, on: Callable[[str], str]) -> list[Aside]:
    """The intervention records on the subjects ``on`` names under the stream's prefix."""
    log = topology.interventions
    if log is None:
        return []
    pattern = on(log.subject_prefix)
    found = []
    for stored in await read_subject(nc, log.stream, pattern):
        try:
            record = msgspec.json.decode(stored.data, type=interventions.Intervention)
        except msgspec.DecodeError:
            continue
        detail = _intervention_detail(record)
        fields = msgspec.to_builtins(record)
        found.append(Aside(stored.time, "intervention", record.function, pattern, detail, fields))
    return found


def _intervention_detail(record: interventions.Intervention) -> str:
    why = f" ({record.reason})" if record.reason else ""
    if record.action == "cancel":
        return f"cancel requested by {record.by}{why}: {record.answer}, {record.rule}"
    return f"{record.function} {record.action}d by {record.by}{why}"


def _during(asides: list[Aside], steps: list[Step], open_until: datetime | None) -> list[Aside]:
    """The functions' interventions while the order was open."""
    start, end = steps[0].time, open_until or steps[-1].time
    return [a for a in asides if start <= a.time <= end]


async def load(
    nc: Client,
    topology: Topology,
    order_ids: Iterable[str],
    instances: Mapping[str, int] | None = None,
) -> dict[str, Trace]:
    """Traces of ``order_ids`` (those with anything in the log); each costs its own size.

    ``instances``: how many processes of each function answer, if the caller
    knows (the console's snapshot); else they are asked, all functions at once.
    """
    found: dict[str, tuple[list[Step], list[Aside], list[Aside], list[Aside]]] = {}
    ids = list(dict.fromkeys(order_ids))
    for start in range(0, len(ids), READ_TOGETHER):
        chunk = ids[start : start + READ_TOGETHER]
        read = await asyncio.gather(*(_read_order(nc, topology, o) for o in chunk))
        found.update((o, r) for o, r in zip(chunk, read, strict=True) if r is not None)
    owing = {
        order_id: waiting_on([s.kind for s in steps], topology)
        for order_id, (steps, _, _, _) in found.items()
    }
    owing_functions = sorted(
        {f for owed in owing.values() for f, _, _ in owed if f in topology.functions}
    )
    states = await asyncio.gather(*(_consumer_state(nc, topology, n) for n in owing_functions))
    consumers = dict(zip(owing_functions, states, strict=True))
    # Instances answering the NATS micro protocol, asked only of functions owing a step.
    if instances is None:
        answers = await asyncio.gather(
            *(ask_all(nc, subjects.service_api("PING", n)) for n in owing_functions)
        )
        instances = {n: len(a) for n, a in zip(owing_functions, answers, strict=True)}
    for name in owing_functions:
        consumers[name]["instances"] = instances.get(name, 0)
    # The record of a pause only where the consumers' info (just read) shows one.
    pauses = await asyncio.gather(*(
        interventions.pause_of(nc, topology, n, bool(consumers[n]["paused"]))
        for n in owing_functions
    ))  # fmt: skip
    paused = {
        n: interventions.describe(p) for n, p in zip(owing_functions, pauses, strict=True) if p
    }
    # Pauses and resumes: read once for every order here, kept where each was open.
    every_function = partial(subjects.intervention_on_function, function="*")
    to_functions = await _interventions(nc, topology, every_function) if found else []
    traces = {}
    for order_id, (steps, retries, dead, asked) in found.items():
        owed = []
        for function, what, due_to in owing[order_id]:
            since = max((s.time for s in steps if s.kind in due_to), default=steps[0].time)
            held = [d for d in dead if d.function == function and d.subject in due_to]
            owed.append(Owed(function, what, since, consumers.get(function, {}), held,
                             paused.get(function, "")))  # fmt: skip
        trace = Trace(order_id, steps, retries, dead, owed)
        open_until = None if trace.outcome else datetime.now(UTC)
        trace.interventions = asked + _during(to_functions, steps, open_until)
        traces[order_id] = trace
    return traces


async def _read_order(
    nc: Client, topology: Topology, order_id: str
) -> tuple[list[Step], list[Aside], list[Aside], list[Aside]] | None:
    messages = await order_messages(nc, topology, order_id)
    if not messages:
        return None
    (retries, dead), asked = await asyncio.gather(
        _asides(nc, topology, order_id),
        _interventions(nc, topology, lambda p: subjects.intervention_on_order(p, order_id)),
    )
    return steps_of(messages, topology.events_stream), retries, dead, asked


async def in_flight(nc: Client, topology: Topology) -> set[str]:
    """Every order that may be unfinished, found without reading the history.

    An order that is not finished is waiting for some function, so one of its
    messages is either not yet settled by that function's consumer (past the
    consumer's ack floor: waiting, in hand, or settled out of order just
    now) or in the dead letters. Reading exactly those costs what the
    unfinished orders (and the consumers' windows) cost, however long the
    history behind them.
    """
    found = {o for s in await _unsettled(nc, topology) if (o := order_of(s.subject, s.data))}
    letters = topology.dead_letters
    for stored in await read_subject(nc, letters.stream, f"{letters.subject_prefix}.>"):
        head = stored.subject.split(".")  # dlq.<ID>.<function>
        if len(head) >= 3 and head[1] != subjects.NO_ORDER:
            found.add(head[1])
    return found


async def stuck(
    nc: Client,
    topology: Topology,
    older_than: float,
    now: datetime,
    instances: Mapping[str, int] | None = None,
) -> list[Trace]:
    """Unfinished orders that started more than ``older_than`` seconds before ``now``."""
    traces = await load(nc, topology, sorted(await in_flight(nc, topology)), instances)
    late = [
        t
        for t in traces.values()
        if not t.outcome and (now - t.steps[0].time).total_seconds() >= older_than
    ]
    return sorted(late, key=lambda t: t.steps[0].time)


# --- rendering ---------------------------------------------------------------


def _ago(since: datetime, now: datetime) -> str:
    return f"{(now - since).total_seconds():.1f} s ago"


def render(trace: Trace, now: datetime) -> str:
    t0 = trace.steps[0].time
    done = trace.outcome
    took = (trace.steps[-1].time - t0).total_seconds() * 1000
    head = f"order {trace.order_id}: " + (
        f"{done} in {took:.1f} ms" if done else f"NOT FINISHED, started {_ago(t0, now)}"
    )
    head += f" ({len(trace.steps)} events, {len(trace.retries)} retries, "
    head += f"{len(trace.dead_letters)} dead letters)"
    lines = [head, ""]
    ev = max(20, *(len(s.kind) for s in trace.steps))
    by = max(9, *(len(s.by) for s in trace.steps))
    lines.append(f"  {'at':>10}  {'event':<{ev}} {'by':<{by}} {'caused by':<{ev}} {'hop':>9}")
    # One timeline: the events, and beside them in time what else happened.
    rows: list[tuple[datetime, str]] = []
    for s in trace.steps:
        hop = f"{s.hop_ms:.1f} ms" if s.hop_ms is not None else ""
        cause = s.caused_by or ""
        rows.append((s.time, f"{s.kind:<{ev}} {s.by:<{by}} {cause:<{ev}} {hop:>9}"))
    for a in trace.retries + trace.dead_letters + trace.interventions:
        if a.kind == "intervention":
            rows.append((a.time, f"INTERVENTION: {a.detail}"))
        else:
            rows.append((a.time, f"{a.kind.upper()}: {a.function} on {a.subject}: {a.detail}"))
    for when, text in sorted(rows, key=lambda row: row[0]):
        offset = (when - t0).total_seconds() * 1000
        at = f"{'+' if offset >= 0 else '-'}{abs(offset):.1f} ms"
        lines.append(f"  {at:>10}  {text}")
    for o in trace.owed:
        c = o.consumer
        lines.append(
            f"\n  waiting for {o.what}: {o.function} owes it (due since {_ago(o.since, now)}); "
            f"consumer {o.function}: {c.get('pending', 0):,} pending, {c.get('unacked', 0):,} "
            f"unacked, {c.get('instances', 0)} instances answering"
            + (" - is any instance running?" if not c.get("instances") else "")
            + (f"\n  {o.function} is {o.paused}: runner.py resume {o.function}" if o.paused else "")
        )
        for d in o.held_by:
            lines.append(
                f"  HELD by dead letter {d.fields.get('id')} ({d.detail}); once the cause is "
                f"fixed: runner.py dlq redrive {d.fields.get('id')}"
            )
    return "\n".join(lines)


def as_json(trace: Trace, now: datetime) -> dict[str, object]:
    return {
        "order_id": trace.order_id,
        "outcome": trace.outcome,
        "steps": [
            {
                "sequence": s.sequence,
                "time": s.time.isoformat(),
                "subject": s.subject,
                "kind": s.kind,
                "by": s.by,
                "event_id": s.event_id,
                "caused_by": s.caused_by,
                "hop_ms": s.hop_ms,
                "payload": s.payload,
            }
            for s in trace.steps
        ],
        "retries": [_aside_json(a) for a in trace.retries],
        "dead_letters": [_aside_json(a) for a in trace.dead_letters],
        "interventions": [_aside_json(a) for a in trace.interventions],
        "waiting_for": [
            {
                "function": o.function,
                "what": o.what,
                "due_for_s": (now - o.since).total_seconds(),
                "consumer": o.consumer,
                "held_by_dead_letters": [d.fields.get("id") for d in o.held_by],
                "paused": o.paused,
            }
            for o in trace.owed
        ],
    }


def _aside_json(a: Aside) -> dict[str, object]:
    return {"time": a.time.isoformat(), "function": a.function, "subject": a.subject,
            "detail": a.detail, **a.fields}  # fmt: skip


def _consumed(fn: FunctionSpec) -> set[str]:
    return {k for c in fn.consumers for k in c.events}


def _node(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def mermaid_sequence(trace: Trace, topology: Topology) -> str:
    """The order as a Mermaid sequence diagram: each event from its emitter to its readers."""
    readers = {
        kind: [name for name, fn in topology.functions.items() if kind in _consumed(fn)]
        for kind in {s.kind for s in trace.steps}
    }
    lines = ["sequenceDiagram", "  participant client"]
    lines += [f"  participant {name}" for name in topology.functions]
    for s in trace.steps:
        for reader in readers[s.kind] or ["client"]:
            hop = f" (+{s.hop_ms:.0f} ms)" if s.hop_ms is not None else ""
            lines.append(f"  {s.by}->>{reader}: {s.kind}{hop}")
    for a in sorted(trace.retries + trace.dead_letters, key=lambda a: a.time):
        lines.append(f"  Note over {a.function}: {a.kind} on {a.subject}")
    return "\n".join(lines)


def mermaid_map(topology: Topology) -> str:
    """The topology of ``streams.yaml`` as a Mermaid flowchart: who consumes and emits what."""
    lines = ["flowchart LR"]
    kinds = sorted(
        {k for fn in topology.functions.values() for k in _consumed(fn)}
        | {k for fn in topology.functions.values() for k in fn.emits}
    )
    lines += [f'  {_node(k)}(["{k}"])' for k in kinds]
    for name, fn in topology.functions.items():
        lines.append(f"  {_node(name)}[[{name}]]")
        for kind in sorted(_consumed(fn)):
            lines.append(f"  {_node(kind)} --> {_node(name)}")
        for kind in fn.emits:
            lines.append(f"  {_node(name)} --> {_node(kind)}")
    return "\n".join(lines)
