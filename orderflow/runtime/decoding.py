"""Bytes on a subject -> an event, or the reason why not.

Shared by the pull loop and the offline replayer, so a recording replays
through exactly the validation the live system applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from functions.events import EVENT_TYPES, AnyOrderId, Event
from orderflow import limits as limits_mod
from orderflow import subjects
from orderflow.limits import Limits

_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in EVENT_TYPES.items()}
_order_id = msgspec.json.Decoder(AnyOrderId)


@dataclass(frozen=True)
class Invalid:
    reason: str
    #: whether the publisher deserves an answer (``orders.rejected``), not just a dead letter
    rejectable: bool = True


def decode(
    subject: str, data: bytes, max_payload: int, limits: Limits | None = None
) -> Event | Invalid:
    """The event on ``subject`` (``orderflow.subjects``: its kind, and its order id but
    for payload-only ingress), or why not."""
    if len(data) > max_payload:
        return Invalid(f"payload of {len(data)} bytes exceeds max_payload {max_payload}")
    order_id, kind = subjects.parse(subject)
    decoder = _decoders.get(kind)
    if decoder is None:
        return Invalid(f"no event type is published on {subject}", rejectable=False)
    try:
        event: Event = decoder.decode(data)
    except msgspec.ValidationError as exc:
        return Invalid(f"invalid {kind}: {exc}")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
        return Invalid(f"{kind} is not valid JSON: {exc}")
    if order_id is not None and order_id != event.order_id:
        # The subject is what the log is searched by: an event filed under
        # another order would be found there and not here.
        return Invalid(
            f"{kind} on {subject} names order {order_id!r} in its subject "
            f"and {event.order_id!r} in its payload"
        )
    if limits is not None and (over := limits_mod.check(event, limits)) is not None:
        return Invalid(f"{kind} over limits: {over}")
    return event


class _AnyId(msgspec.Struct):
    order_id: Annotated[str, Meta(min_length=1, max_length=200)]


_any_id = msgspec.json.Decoder(_AnyId)


def claimed_order_id(data: bytes) -> str | None:
    """The ``order_id`` a message claims, valid or not (for telling its publisher why not)."""
    try:
        return _any_id.decode(data).order_id
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def readable_order_id(data: bytes) -> str | None:
    """The order id of a message that failed to decode, when it can still be read."""
    try:
        return _order_id.decode(data).order_id
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def order_of(subject: str, data: bytes) -> str | None:
    """The order a message belongs to: its subject says, or else its payload, if readable."""
    return subjects.parse(subject)[0] or readable_order_id(data)
