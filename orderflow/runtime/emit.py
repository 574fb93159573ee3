"""How an emitted event reaches the log: its subject, its headers, and at most once.

Every event is stored on its order's subject (``orderflow.subjects``) with the
context headers (``orderflow.runtime.context``). What makes a second emission of the
same event harmless, by kind:

* an order's *events* (each kind at most once per order) are guarded by
  ``Nats-Expected-Last-Subject-Sequence: 0``: the stream stores the first and
  refuses every later one, however late (a redrive days after, a redelivery
  after a server restart); the refusal means "stored already", so it counts
  as success;
* the delivery decision (``delivery.scheduled`` or ``delivery.cancelled``) is
  checked the same way against both subjects
  (``Nats-Expected-Last-Subject-Sequence-Subject``): the first stored decides,
  and the refusal of the other means "decided already", also a success (a
  cancelled order's late ``delivery.scheduled`` is dropped here, by the stream);
* the orchestrator's *commands* and *alarms* may be sent again on purpose (a
  new attempt after a deadline): each attempt has its own ``Nats-Msg-Id``,
  and the duplicate window drops a repeat of the same attempt;
* a *rejection* answers one rejected message: its id names that message.

Publishes are plain requests with the answer decoded here
(``orderflow.runtime.election.store``), asked again while a cluster's stream is
between leaders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.errors import Permanent
from functions.events import (
    DELIVERY_DECISIONS,
    AlarmCleared,
    Command,
    Event,
    StepTimedOut,
    event_id,
)
from functions.events import subject_of as kind_of
from orderflow import subjects
from orderflow.runtime import election
from orderflow.runtime.context import headers_for, input_event_id
from orderflow.runtime.tracing import OFF, Tracer

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
#: The subject (a filter, nats-server 2.11+) the expectation above is checked on.
EXPECTED_ON_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Cause:
    """What an emitted event was caused by: the input's headers and its id."""

    headers: Mapping[str, str]
    id: str

    @classmethod
    def of(cls, msg: Msg) -> Cause:
        """A consumed message's: its own id, or its place in the log."""
        headers = msg.headers or {}
        meta = msg.metadata
        return cls(headers, input_event_id(headers, meta.stream, meta.sequence.stream))


class Refused(Exception):
    """The stream refused an event for a reason other than having it already."""


def placement(event: Event) -> tuple[str, dict[str, str]]:
    """The subject an event is published on and the headers that make a repeat harmless."""
    kind = kind_of(type(event))
    if isinstance(event, StepTimedOut):
        # An alarm: the server stores it as a schedule (replacing the order's
        # previous one) and publishes it on the timeout subject delay_ms from
        # now. The clock is read here, in the runner, so the orchestrator's
        # decisions stay pure.
        target = subjects.subject(kind, event.order_id)
        at = datetime.now(UTC) + timedelta(milliseconds=event.delay_ms)
        return subjects.published_on(kind, event.order_id), {
            "Nats-Msg-Id": event_id(event),
            "Nats-Schedule": f"@at {at.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}",
            "Nats-Schedule-Target": target,
        }
    if isinstance(event, AlarmCleared):
        # A plain message rolled up over the schedule withdraws it, and
        # expires itself: nothing of the alarm is left in the stream.
        return subjects.published_on(kind, event.order_id), {
            "Nats-Msg-Id": event_id(event),
            "Nats-Rollup": "sub",
            "Nats-TTL": "1s",
        }
    subject = subjects.subject(kind, event.order_id)
    if isinstance(event, Command):
        return subject, {"Nats-Msg-Id": event_id(event)}
    if isinstance(event, DELIVERY_DECISIONS):
        return subject, {
            EXPECTED_LAST_SUBJECT_SEQUENCE: "0",
            EXPECTED_ON_SUBJECT: subjects.decision(event.order_id),
        }
    return subject, {EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}


def check_emits(function: str, emits: Iterable[str], events: Sequence[Event]) -> None:
    """Only what ``streams.yaml`` says the function emits; anything else is a bug."""
    allowed = set(emits)
    undeclared = [k for e in events if (k := kind_of(type(e))) not in allowed]
    if undeclared:
        # A bug, not bad luck: retrying would publish the same thing again.
        raise Permanent(
            f"{function} emitted {', '.join(undeclared)}, not in "
            f"functions.{function}.emits ({', '.join(sorted(allowed)) or 'nothing'})"
        )


class Emitter:
    """Publishes what one function emits, each event with the context of its cause."""

    def __init__(
        self, nc: Client, function: str, emits: Sequence[str], tracer: Tracer = OFF
    ) -> None:
        self.nc = nc
        self.function = function
        self.emits = frozenset(emits)
        # election.store itself when tracing is off; with it, the same and a send span.
        self._store = tracer.storing(election.store)

    def check(self, events: Sequence[Event]) -> None:
        check_emits(self.function, self.emits, events)

    async def emit(self, event: Event, cause: Cause, message_id: str | None = None) -> None:
        """Store ``event``, caused by ``cause``; ``message_id`` replaces the guard (rejections)."""
        subject, guard = placement(event)
        if message_id is not None:
            guard = {"Nats-Msg-Id": message_id}
        headers = headers_for(
            event_id=event_id(event),
            order_id=event.order_id,
            function=self.function,
            cause=cause.headers,
            cause_id=cause.id,
            schema_version=event.schema_version,
        )
        headers |= guard
        ack = await self._store(self.nc, subject, _encode(event), headers)
        if ack.error is None:
            return
        if (
            ack.error.err_code == election.WRONG_LAST_SEQUENCE
            and EXPECTED_LAST_SUBJECT_SEQUENCE in guard
        ):
            return  # the order has this event (or its decision) already: a repeat
        raise Refused(f"{subject}: {ack.error.err_code} {ack.error.description}")
