"""Asking a stream that is between leaders: ask again until the timeout, not just once.

In a cluster a replicated stream takes writes through its leader only. When
the leader is lost (its server crashed), nobody answers on the stream's
subjects until the survivors have noticed and elected another: 4-7 s after a
SIGKILL, measured (bench/README.md; docs/deployment.md, "Running on a NATS
cluster"). nats-py fails a request in that gap at once with *no responders*,
which would burn one of a message's deliveries per attempt; here it counts as "no answer yet" and is
asked again every :data:`POLL` seconds until the request's timeout (the way
nats.go's JetStream publish retries no responders).

A *timeout* is not retried here: its outcome is unknown (the old leader may
have stored the write before it died). The callers settle that by design: an
event is guarded by its subject's expected last sequence (or a command by its
message id), so a repeat is refused as stored already, and a compare-and-set
that was in fact applied fails when the handler tries it again, so the
handler reads again and finds its own write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

T = TypeVar("T")

#: Seconds between attempts while nobody answers for a stream.
POLL = 0.25
#: nats-py's default for a JetStream publish.
PUBLISH_TIMEOUT = 5.0
#: A clustered stream's answer to a message id another publish is still
#: replicating (a redelivered input racing its first attempt): once that one
#: is stored, asking again gets the duplicate's ack.
DUPLICATE_IN_FLIGHT = 10158  # JSStreamDuplicateMessageConflict
#: A subject's last sequence is not what the publish expected.
WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErr
#: The same from a clustered stream's leader while an earlier write to the
#: subject is still being replicated (it cannot say which sequence is last yet).
WRONG_LAST_SEQUENCE_IN_FLIGHT = 10164  # JSStreamWrongLastSequenceConstantErr


async def retrying(call: Callable[[], Awaitable[T]], timeout: float) -> T:
    """``call()``, called again while no server answers for it, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except nats.errors.NoRespondersError:
            if time.monotonic() + POLL >= deadline:
                raise
            await asyncio.sleep(POLL)


async def request(
    nc: Client,
    subject: str,
    payload: bytes,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> Msg:
    """``nc.request``, asked again while no server answers for ``subject``, within ``timeout``."""
    deadline = time.monotonic() + timeout

    def ask() -> Awaitable[Msg]:
        left = max(deadline - time.monotonic(), POLL)
        return nc.request(subject, payload, timeout=left, headers=headers)

    return await retrying(ask, timeout)


class ApiError(msgspec.Struct):
    err_code: int = 0
    description: str = ""


class Ack(msgspec.Struct):
    """A stream's answer to a publish: where it stored it, or why not."""

    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None


_decode_ack = msgspec.json.Decoder(Ack).decode


async def store(
    nc: Client,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = PUBLISH_TIMEOUT,
) -> Ack:
    """A JetStream publish as a plain request, its answer decoded, never raised.

    Asked again while no stream answers (:func:`request`) or while the same
    message id or subject is still being stored by another publish (a
    redelivered input racing its first attempt, in a cluster). Lighter than
    ``js.publish`` (no PubAck dataclass, no JSON module), and a refusal comes
    back as ``Ack.error`` for the caller to judge: for a guarded emit, "the
    subject has a message already" is success.
    """
    deadline = time.monotonic() + timeout
    while True:
        reply = await request(nc, subject, payload, max(deadline - time.monotonic(), POLL), headers)
        ack = _decode_ack(reply.data)
        in_flight = ack.error is not None and ack.error.err_code in (
            DUPLICATE_IN_FLIGHT,
            WRONG_LAST_SEQUENCE_IN_FLIGHT,
        )
        if not in_flight or time.monotonic() + POLL >= deadline:
            return ack
        await asyncio.sleep(POLL)
