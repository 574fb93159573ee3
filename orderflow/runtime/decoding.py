"""Bytes on a subject -> an event at the current version of its schema, or the reason why not.

Shared by the pull loop, the order's history and the offline replayer, so a
recording replays through exactly the validation the live system applies.

A message says the schema version it was written with in its
``Orderflow-Schema-Version`` header (``orderflow.runtime.context``); none
means 1. One written with an older version than this code's goes through the
upcasters (``functions/upcasters.py``) as JSON first, then into its Struct;
one at the current version goes straight into it, the fast way. One written
with a *newer* version is read as the current one (tolerant readers: a newer
writer's added fields are ignored); if that fails, the reason says which
version wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from functions import upcasters
from functions.events import EVENT_TYPES, AnyOrderId, Event
from orderflow import limits as limits_mod
from orderflow import subjects
from orderflow.limits import Limits
from orderflow.runtime.context import SCHEMA_VERSION

_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in EVENT_TYPES.items()}
_order_id = msgspec.json.Decoder(AnyOrderId)


def version_in(headers: Mapping[str, str]) -> int:
    """The schema version a message says it was written with (none: 1); ``ValueError``
    if the header is not a version."""
    given = headers.get(SCHEMA_VERSION)
    if given is None:
        return 1
    if not (given.isascii() and given.isdigit()) or int(given) < 1:
        raise ValueError(f"header {SCHEMA_VERSION}: {given!r} is not a schema version (1, 2, ...)")
    return int(given)


def as_current(kind: str, data: bytes, version: int) -> object:
    """The payload as JSON, upgraded from ``version`` to the current version of ``kind``."""
    payload = msgspec.json.decode(data)
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        return payload
    return upcasters.upgrade(kind, version, payload, cls.schema_version)


def read(kind: str, data: bytes, version: int) -> Event:
    """The event of ``kind`` in ``data``, written with schema ``version``; raises what msgspec
    raises for a message that is not one (``ValidationError`` names the path)."""
    cls = EVENT_TYPES[kind]
    if version >= cls.schema_version:
        event: Event = _decoders[kind].decode(data)
        return event
    upgraded: Event = msgspec.convert(as_current(kind, data, version), cls)
    return upgraded


@dataclass(frozen=True)
class Invalid:
    reason: str
    #: whether the publisher deserves an answer (``orders.rejected``), not just a dead letter
    rejectable: bool = True


def decode(
    subject: str,
    data: bytes,
    headers: Mapping[str, str],
    max_payload: int,
    limits: Limits | None = None,
) -> Event | Invalid:
    """The event on ``subject`` (``orderflow.subjects``: its kind, and its order id but
    for payload-only ingress) with ``headers`` (its schema version), or why not."""
    if len(data) > max_payload:
        return Invalid(f"payload of {len(data)} bytes exceeds max_payload {max_payload}")
    order_id, kind = subjects.parse(subject)
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        return Invalid(f"no event type is published on {subject}", rejectable=False)
    try:
        version = version_in(headers)
    except ValueError as exc:
        return Invalid(f"invalid {kind}: {exc}")
    try:
        event = read(kind, data, version)
    except msgspec.ValidationError as exc:
        newer = (
            f" (written with schema version {version}; this reader knows up to "
            f"{cls.schema_version})"
            if version > cls.schema_version
            else ""
        )
        return Invalid(f"invalid {kind}: {exc}{newer}")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
        return Invalid(f"{kind} is not valid JSON: {exc}")
    except Exception as exc:  # an upcaster that could not take what the message holds
        return Invalid(
            f"invalid {kind}: version {version} could not be upgraded to "
            f"{cls.schema_version}: {type(exc).__name__}: {exc}"
        )
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
