"""Read a stream from the log itself: every stored message, in order, without disturbing anyone.

An ephemeral consumer with no acks reads from the first sequence (or a given
one) to the last and goes away; the durable consumers of the functions never
notice. Tests use it to check what the flow really stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from functions.events import Event
from orderflow import subjects
from orderflow.runtime import decoding, direct

#: Fetches answered 503 (nobody serves the consumer yet) before giving up, 0.1 s apart.
UNAVAILABLE_TRIES = 50


@dataclass(frozen=True)
class Stored:
    subject: str
    data: bytes
    headers: dict[str, str]
    sequence: int
    time: datetime

    @property
    def kind(self) -> str:
        """The event's kind (``payments.succeeded``), whatever order's subject it is on."""
        return subjects.kind_of(self.subject)

    def event(self) -> Event:
        """The stored event at the current version of its schema (an older one upgraded)."""
        return decoding.read(self.kind, self.data, decoding.version_in(self.headers))


async def read_stream(
    nc: Client,
    stream: str,
    subjects: list[str] | None = None,
    from_seq: int = 1,
    since: datetime | None = None,
    batch: int = 1000,
    on_batch: Callable[[int], None] | None = None,
) -> list[Stored]:
    """Every message of ``stream`` (from ``from_seq``, or stored at or after ``since``)."""
    js = nc.jetstream()
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=None if since else max(from_seq, 1),
        opt_start_time=since,
        filter_subjects=subjects or None,
        inactive_threshold=30.0,
    )
    sub = await js.pull_subscribe("", stream=stream, config=config)
    out: list[Stored] = []
    unavailable = 0
    try:
        while True:
            try:
                msgs = await sub.fetch(batch=batch, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            except nats.js.errors.ServiceUnavailableError:
                # 503: no server answers for the new consumer yet (in a cluster
                # the word of it can trail the reply that created it).
                unavailable += 1
                if unavailable > UNAVAILABLE_TRIES:
                    raise
                await asyncio.sleep(0.1)
                continue
            for msg in msgs:
                meta = msg.metadata
                headers = dict(msg.headers or {})
                stored = Stored(
                    msg.subject, msg.data, headers, meta.sequence.stream, meta.timestamp
                )
                out.append(stored)
            if on_batch is not None:
                on_batch(len(out))
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


# --- one order's messages, by subject ------------------------------------------
#
# An order's events share a subject prefix (orderflow/subjects.py), so the
# server's subject index finds them directly: a batch direct get of the
# filter returns just those messages, however long the stream. Two requests:
# the first returns the first match and says how many more there are, the
# second asks for exactly all of them. Asking for more than there are would
# make the server look past the last match, through every later block of a
# large stream, to be sure there is none.

#: Messages of one filter read at most (an order has a dozen or so).
MAX_PER_FILTER = 10_000


def _stored(msg: Msg) -> Stored:
    h = dict(msg.headers or {})
    stamp = h.pop("Nats-Time-Stamp", "")
    subject = h.pop("Nats-Subject", msg.subject)
    sequence = int(h.pop("Nats-Sequence", "0"))
    for server_only in ("Nats-Stream", "Nats-Num-Pending", "Nats-Last-Sequence"):
        h.pop(server_only, None)
    return Stored(subject, msg.data, h, sequence, _timestamp(stamp))


def _timestamp(stamp: str) -> datetime:
    # RFC 3339 with nanoseconds; Python's datetime keeps microseconds.
    head, dot, rest = stamp.rstrip("Z").partition(".")
    fraction = rest[:6].ljust(6, "0") if dot else "000000"
    return datetime.fromisoformat(f"{head}.{fraction}+00:00")


async def direct_batch(
    nc: Client, stream: str, request: dict[str, object], timeout: float = 5.0
) -> tuple[list[Stored], int]:
    """The messages one batch direct get returns, and how many more match after them."""
    batch = direct.BatchGet(nc, stream, timeout)
    try:
        found, pending = await batch.ask(request)
    finally:
        await batch.close()
    return [_stored(msg) for msg in found], pending


async def read_subject(
    nc: Client, stream: str, subject_filter: str, from_seq: int = 0, timeout: float = 5.0
) -> list[Stored]:
    """Every message of ``stream`` on ``subject_filter`` (from ``from_seq``), in order,
    found by the subject index."""
    first, pending = await direct_batch(
        nc, stream, {"seq": from_seq, "next_by_subj": subject_filter, "batch": 1}, timeout
    )
    if not first or not pending:
        return first
    # From the same start again, for exactly as many: a start at the stream's
    # first sequence lets the server count the matches from its subject index;
    # a start past the first match made it walk every block after it (on a
    # cold 1M-message stream, 400 ms instead of 20, bench/README.md).
    every, _ = await direct_batch(
        nc,
        stream,
        {
            "seq": from_seq,
            "next_by_subj": subject_filter,
            "batch": min(1 + pending, MAX_PER_FILTER),
        },
        timeout,
    )
    if 1 + pending > MAX_PER_FILTER and every:
        # More than one batch holds (a long list of dead letters): on past the last.
        every += await read_subject(nc, stream, subject_filter, every[-1].sequence + 1, timeout)
    return every


async def matches_from(nc: Client, stream: str, subject_filter: str, first: int) -> int:
    """How many messages on ``subject_filter`` are stored from sequence ``first`` on, counted
    by the subject index (from near the end: the cost of the messages after ``first``)."""
    found, pending = await direct_batch(
        nc, stream, {"seq": first, "next_by_subj": subject_filter, "batch": 1}
    )
    return len(found) + pending if found else 0


async def matches_between(
    nc: Client, stream: str, subject_filter: str, first: int, end: int
) -> int:
    """How many messages on ``subject_filter`` are stored from ``first`` to ``end``, both in."""
    if end < first:
        return 0
    upto, after = await asyncio.gather(
        matches_from(nc, stream, subject_filter, first),
        matches_from(nc, stream, subject_filter, end + 1),
    )
    return max(0, upto - after)


async def read_at(nc: Client, stream: str, sequence: int, timeout: float = 5.0) -> Stored | None:
    """The message at ``sequence``, or ``None`` (gone, or never there)."""
    msg = await nc.request(
        subjects.direct_get(stream),
        msgspec.json.encode({"seq": sequence}),
        timeout=timeout,
    )
    if not msg.data and (msg.headers or {}).get("Status"):
        return None
    return _stored(msg)
