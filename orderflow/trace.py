"""Trace an order from the log itself: what happened, who did it, and who owes the next step.

Choreography has no central record of a flow, but the log is one: every event
names its emitter, its cause and its order (``orderflow.context``), failed
attempts are noted in the retry log and given-up messages in the dead
letters. This module reads all three for one order and lays them out as a
causal timeline. When the order is not finished, :func:`waiting_on` says what
the flow expects next and which function owes it, and the consumer of that
function says whether anyone is there to do it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from nats.aio.client import Client

from functions.events import TERMINAL_SUBJECTS
from orderflow import context as ctx
from orderflow import deadletter as dl
from orderflow.config import Mode, Topology, subject_matches
from orderflow.decoding import readable_order_id
from orderflow.status import ask_all
from orderflow.streamlog import Stored, read_stream


@dataclass(frozen=True)
class Step:
    """An event of the order, placed in time and in its causal chain."""

    sequence: int
    time: datetime
    subject: str
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


@dataclass
class Trace:
    order_id: str
    steps: list[Step]
    retries: list[Aside]
    dead_letters: list[Aside]
    owed: list[Owed]

    @property
    def outcome(self) -> str | None:
        done = [
            s.subject for s in self.steps if s.subject in TERMINAL_SUBJECTS | {"orders.rejected"}
        ]
        return done[0].rsplit(".", 1)[1] if done else None


# --- what should happen next -------------------------------------------------


Owing = list[tuple[str, str, set[str]]]


def waiting_on(logged: Sequence[str], mode: Mode = "choreography") -> Owing:
    """Pure: (function, what it owes, the subjects that made it due) for an unfinished order.

    ``logged``: the subjects of the order's messages, in log order.
    """
    if set(logged) & (TERMINAL_SUBJECTS | {"orders.rejected"}):
        return []
    if mode == "orchestration":
        return _saga_waiting_on(logged)
    return _choreography_waiting_on(set(logged))


def _saga_waiting_on(logged: Sequence[str]) -> Owing:
    """A saga does one thing at a time: the last command awaits its function's answer;
    anything else awaits the orchestrator's next command. Fired deadlines and
    alarms change neither: a command sent again is logged as one, and one that
    is not (the step waits) is still owed by its function."""
    last = next((s for s in reversed(logged) if not s.startswith("saga.alarms.")
                 and s != "saga.timeout"), logged[-1])  # fmt: skip
    command = last.split(".")
    if len(command) == 3 and command[0] == "saga":  # saga.<function>.<verb>
        return [(command[1], f"its answer to {last}", {last})]
    return [("orchestrator", "the next command, or the terminal event", {last})]


def _choreography_waiting_on(subjects: set[str]) -> Owing:
    """The choreography read backwards: each rule is one reaction of README's
    flow whose trigger is in the log and whose answer is not."""
    paid, failed = "payments.succeeded" in subjects, "payments.failed" in subjects
    reserved, short = "stock.reserved" in subjects, "stock.unavailable" in subjects
    owed = []
    if not (paid or failed):
        owed.append(("payment", "payments.succeeded or payments.failed", {"orders.created"}))
    if not (reserved or short):
        owed.append(("stock", "stock.reserved or stock.unavailable", {"orders.created"}))
    if paid and reserved and "delivery.scheduled" not in subjects:
        owed.append(("delivery", "delivery.scheduled", {"payments.succeeded", "stock.reserved"}))
    if failed and reserved and "stock.released" not in subjects:
        owed.append(("stock", "stock.released", {"payments.failed", "stock.reserved"}))
    if paid and short and "payments.refunded" not in subjects:
        owed.append(("payment", "payments.refunded", {"payments.succeeded", "stock.unavailable"}))
    if not owed:
        owed.append(
            ("order", "orders.completed or orders.cancelled", subjects - {"orders.created"})
        )
    return owed


# --- reading the log ---------------------------------------------------------


def _order_of(stored: Stored) -> str | None:
    return stored.headers.get(ctx.CORRELATION_ID) or readable_order_id(stored.data)


def _payload(data: bytes) -> object:
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return data.decode(errors="replace")


def steps_of(events: list[Stored]) -> list[Step]:
    by_id: dict[str, Stored] = {}
    steps = []
    for e in events:
        event_id = ctx.input_event_id(e.headers, "ORDERS", e.sequence)
        by_id[event_id] = e
        cause = by_id.get(e.headers.get(ctx.CAUSATION_ID, ""))
        steps.append(
            Step(
                sequence=e.sequence,
                time=e.time,
                subject=e.subject,
                by=e.headers.get(ctx.FUNCTION, "client"),
                event_id=event_id,
                caused_by=cause.subject if cause else None,
                hop_ms=(e.time - cause.time).total_seconds() * 1000 if cause else None,
                payload=_payload(e.data),
            )
        )
    return steps


async def _consumer_state(nc: Client, topology: Topology, function: str) -> dict[str, int]:
    js = nc.jetstream()
    state = {"pending": 0, "unacked": 0, "redelivered": 0, "fetching": 0}
    for consumer in topology.functions[function].consumers:
        info = await js.consumer_info(consumer.stream, consumer.durable)
        state["pending"] += info.num_pending or 0
        state["unacked"] += info.num_ack_pending or 0
        state["redelivered"] += info.num_redelivered or 0
        state["fetching"] += info.num_waiting or 0  # pull requests outstanding
    return state


def _stream_of(topology: Topology, subject: str) -> str:
    return next(
        s.name for s in topology.streams if any(subject_matches(p, subject) for p in s.subjects)
    )


async def load(
    nc: Client, topology: Topology, order_ids: set[str] | None = None
) -> dict[str, Trace]:
    """Traces of ``order_ids`` (every order in the log when ``None``)."""
    events_stream = _stream_of(topology, "orders.created")
    streams = [events_stream]
    if topology.mode == "orchestration":
        # The orchestrator's fired deadlines: the cause of a command sent again.
        streams += {_stream_of(topology, "saga.timeout")} - {events_stream}
    events: dict[str, list[Stored]] = defaultdict(list)
    for stream in streams:
        for stored in await read_stream(nc, stream):
            order_id = _order_of(stored)
            if order_id and (order_ids is None or order_id in order_ids):
                events[order_id].append(stored)
    for logged in events.values():
        logged.sort(key=lambda stored: stored.time)
    retries: dict[str, list[Aside]] = defaultdict(list)
    if topology.retry_log is not None:
        for stored in await read_stream(nc, topology.retry_log.stream):
            order_id = _order_of(stored)
            note = _payload(stored.data)
            if order_id in events and isinstance(note, dict):
                detail = (
                    f"attempt {note.get('attempt')} failed, again in {note.get('delay_s')} s: "
                    f"{note.get('error')}"
                )
                retries[order_id].append(
                    Aside(
                        stored.time,
                        "retry",
                        str(note.get("function")),
                        str(note.get("subject")),
                        detail,
                        note,
                    )
                )
    dead: dict[str, list[Aside]] = defaultdict(list)
    for stored in await read_stream(nc, topology.dead_letters.stream):
        order_id = _order_of(stored)
        if order_id in events:
            h = stored.headers
            detail = f"dead letter {stored.sequence}: {h.get(dl.REASON, '')}"
            dead[order_id].append(
                Aside(
                    stored.time,
                    "dead letter",
                    h.get(dl.FUNCTION, "?"),
                    h.get(dl.SUBJECT, "?"),
                    detail,
                    {"id": stored.sequence},
                )
            )
    consumers = {name: await _consumer_state(nc, topology, name) for name in topology.functions}
    steps = {order_id: steps_of(logged) for order_id, logged in events.items()}
    owing = {
        order_id: waiting_on([s.subject for s in order], topology.mode)
        for order_id, order in steps.items()
    }
    # Instances answering the NATS micro protocol, asked only of functions owing a step.
    for name in {f for owed in owing.values() for f, _, _ in owed if f in consumers}:
        consumers[name]["instances"] = len(await ask_all(nc, f"$SRV.PING.orderflow-{name}"))
    traces = {}
    for order_id in events:
        owed = []
        for function, what, due_to in owing[order_id]:
            order_steps = steps[order_id]
            since = max(
                (s.time for s in order_steps if s.subject in due_to),
                default=order_steps[0].time,
            )
            held = [d for d in dead[order_id] if d.function == function and d.subject in due_to]
            owed.append(Owed(function, what, since, consumers.get(function, {}), held))
        traces[order_id] = Trace(order_id, steps[order_id], retries[order_id], dead[order_id], owed)
    return traces


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
    ev = max(20, *(len(s.subject) for s in trace.steps))
    by = max(9, *(len(s.by) for s in trace.steps))
    lines.append(f"  {'at':>10}  {'event':<{ev}} {'by':<{by}} {'caused by':<{ev}} {'hop':>9}")
    for s in trace.steps:
        hop = f"{s.hop_ms:.1f} ms" if s.hop_ms is not None else ""
        at = f"+{(s.time - t0).total_seconds() * 1000:.1f} ms"
        cause = s.caused_by or ""
        lines.append(f"  {at:>10}  {s.subject:<{ev}} {s.by:<{by}} {cause:<{ev}} {hop:>9}")
    for a in sorted(trace.retries + trace.dead_letters, key=lambda a: a.time):
        at = f"+{(a.time - t0).total_seconds() * 1000:.1f} ms"
        lines.append(f"  {at:>10}  {a.kind.upper()}: {a.function} on {a.subject}: {a.detail}")
    for o in trace.owed:
        c = o.consumer
        lines.append(
            f"\n  waiting for {o.what}: {o.function} owes it (due since {_ago(o.since, now)}); "
            f"consumer {o.function}: {c.get('pending', 0):,} pending, {c.get('unacked', 0):,} "
            f"unacked, {c.get('instances', 0)} instances answering"
            + (" - is any instance running?" if not c.get("instances") else "")
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
        "waiting_for": [
            {
                "function": o.function,
                "what": o.what,
                "due_for_s": (now - o.since).total_seconds(),
                "consumer": o.consumer,
                "held_by_dead_letters": [d.fields.get("id") for d in o.held_by],
            }
            for o in trace.owed
        ],
    }


def _aside_json(a: Aside) -> dict[str, object]:
    return {"time": a.time.isoformat(), "function": a.function, "subject": a.subject,
            "detail": a.detail, **a.fields}  # fmt: skip


def _node(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def mermaid_sequence(trace: Trace, topology: Topology) -> str:
    """The order as a Mermaid sequence diagram: each event from its emitter to its readers."""
    readers = {
        subject: [
            name
            for name, fn in topology.functions.items()
            if any(subject_matches(f, subject) for c in fn.consumers for f in c.filter_subjects)
        ]
        for subject in {s.subject for s in trace.steps}
    }
    lines = ["sequenceDiagram", "  participant client"]
    lines += [f"  participant {name}" for name in topology.functions]
    for s in trace.steps:
        for reader in readers[s.subject] or ["client"]:
            hop = f" (+{s.hop_ms:.0f} ms)" if s.hop_ms is not None else ""
            lines.append(f"  {s.by}->>{reader}: {s.subject}{hop}")
    for a in sorted(trace.retries + trace.dead_letters, key=lambda a: a.time):
        lines.append(f"  Note over {a.function}: {a.kind} on {a.subject}")
    return "\n".join(lines)


def mermaid_map(topology: Topology) -> str:
    """The topology of ``streams.yaml`` as a Mermaid flowchart: who consumes and emits what."""
    lines = ["flowchart LR"]
    subjects = sorted(
        {f for fn in topology.functions.values() for c in fn.consumers for f in c.filter_subjects}
        | {s for fn in topology.functions.values() for s in fn.emits}
    )
    lines += [f'  {_node(s)}(["{s}"])' for s in subjects]
    for name, fn in topology.functions.items():
        lines.append(f"  {_node(name)}[[{name}]]")
        for subject in sorted({f for c in fn.consumers for f in c.filter_subjects}):
            lines.append(f"  {_node(subject)} --> {_node(name)}")
        for subject in fn.emits:
            lines.append(f"  {_node(name)} --> {_node(subject)}")
    return "\n".join(lines)
