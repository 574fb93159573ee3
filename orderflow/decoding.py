"""Bytes on a subject -> an event, or the reason why not.

Shared by the pull loop and the offline replayer, so a recording replays
through exactly the validation the live system applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from functions.events import EVENT_TYPES, AnyOrderId, Event
from orderflow import limits as limits_mod
from orderflow.limits import Limits

_decoders = {subject: msgspec.json.Decoder(cls) for subject, cls in EVENT_TYPES.items()}
_order_id = msgspec.json.Decoder(AnyOrderId)


@dataclass(frozen=True)
class Invalid:
    reason: str
    #: whether the publisher deserves an answer (``orders.rejected``), not just a dead letter
    rejectable: bool = True


def decode(
    subject: str, data: bytes, max_payload: int, limits: Limits | None = None
) -> Event | Invalid:
    if len(data) > max_payload:
        return Invalid(f"payload of {len(data)} bytes exceeds max_payload {max_payload}")
    decoder = _decoders.get(subject)
    if decoder is None:
        return Invalid(f"no event type is published on {subject}", rejectable=False)
    try:
        event: Event = decoder.decode(data)
    except msgspec.ValidationError as exc:
        return Invalid(f"invalid {subject}: {exc}")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
        return Invalid(f"{subject} is not valid JSON: {exc}")
    if limits is not None and (over := limits_mod.check(event, limits)) is not None:
        return Invalid(f"{subject} over limits: {over}")
    return event


def readable_order_id(data: bytes) -> str | None:
    """The order id of a message that failed to decode, when it can still be read."""
    try:
        return _order_id.decode(data).order_id
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
