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
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from functions.events import EVENT_TYPES, Event

#: Fetches answered 503 (nobody serves the consumer yet) before giving up, 0.1 s apart.
UNAVAILABLE_TRIES = 50


@dataclass(frozen=True)
class Stored:
    subject: str
    data: bytes
    headers: dict[str, str]
    sequence: int
    time: datetime

    def event(self) -> Event:
        decoded: Event = msgspec.json.decode(self.data, type=EVENT_TYPES[self.subject])
        return decoded


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
