"""Old versions of events, upgraded on read: one small pure function per version step.

Every event class says the version of its schema (``schema_version`` in
``functions/events.py``); a message says the version it was written with in
its ``Orderflow-Schema-Version`` header, and none means 1 (``nats pub`` sends
no headers). Before a message is decoded into its Struct, the runner
(``orderflow/runtime/decoding.py``) passes its JSON through the upcasters from
its version to the current one, so handlers only ever see the current version,
whoever wrote the event and however long ago.

An upcaster takes the payload of one version as plain JSON (a dict) and returns
the next version's, a new dict: it reads no clock, no store and no other
event, so an old recording upgrades the same way every time. It is applied
before validation, to whatever the message holds, so it leaves alone what it
cannot upgrade (a missing or mistyped field) and the Struct names the problem.

A version is raised only for a change that old events need an upcaster for (a
new required field, a rename, a new shape); a new optional field with a default
keeps it. Each step is tested on recorded events (``tests/functions/test_upcasters.py``),
and :func:`gaps` makes every process refuse to start with a step missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from functions.events import EVENT_CLASSES, Event, subject_of

#: One event's payload as JSON: what an upcaster takes and returns.
Payload = dict[str, object]
Upcaster = Callable[[Payload], Payload]

#: The carrier of every delivery version 1 scheduled: the built-in one, the only one then. A
#: fact about the past, so not ``functions.delivery.CARRIER``, which may change.
V1_CARRIER = "orderflow-post"


def delivery_scheduled_1_to_2(payload: Payload) -> Payload:
    """``carrier`` is new and required: a version 1 delivery was booked with the one carrier
    there was. One that says a carrier (a writer that left out the header) keeps it."""
    return {"carrier": V1_CARRIER, **payload}


#: (kind, the version it upgrades from) -> the upcaster to the next version.
UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("delivery.scheduled", 1): delivery_scheduled_1_to_2,
}


def gaps(
    table: Mapping[tuple[str, int], Upcaster], classes: Iterable[type[Event]] = EVENT_CLASSES
) -> list[str]:
    """What is wrong with ``table``: a step missing between 1 and a kind's version, or a
    step for a kind or a version there is no such thing as."""
    versions = {subject_of(cls): cls.schema_version for cls in classes}
    problems = [
        f"{kind}: no upcaster from version {v} (its schema_version is {current})"
        for kind, current in versions.items()
        for v in range(1, current)
        if (kind, v) not in table
    ]
    problems += [
        f"{kind}: an upcaster from version {v}, but "
        + (f"its schema_version is {versions[kind]}" if kind in versions else "no such kind")
        for kind, v in table
        if not 1 <= v < versions.get(kind, 0)
    ]
    return problems


def upgrade(kind: str, version: int, payload: object, current: int) -> object:
    """``payload`` (``kind`` at ``version``) at version ``current``; anything but a JSON
    object is left as it is, for the decoder to say what is wrong with it."""
    for step in range(version, current):
        if not isinstance(payload, dict):
            break
        payload = UPCASTERS[kind, step](payload)
    return payload


if problems := gaps(UPCASTERS):
    raise RuntimeError("functions/upcasters.py: " + "; ".join(problems))
