"""The other interface handlers get: the order's own history, read from the log.

Where a function's state is "what has happened to this order" (has the other
half of a join arrived? has the charge been decided?), the answer is already
in the stream, on the order's own subjects. So instead of keeping a copy in a
KV bucket, a handler asks the history:

* ``last(order_id, kind)``: the order's event of that kind, or ``None``; each
  order has each kind at most once, so the last is the only one;
* ``append(event)``: store an event *now*, before reading on (a join's own
  half, see below). At most once per order and kind, and one delivery
  decision per order (``functions.events.DELIVERY_DECISIONS``): appending
  what is stored already, or a decision the order has taken, does nothing.
  Handlers may also just return events, which the runner appends after
  they return.

Why reads after appends are enough: of the two halves of a join, each stored
before its handler reads for the other, the handler of the later-stored half
always finds the earlier one. Both may find each other, and both emit the
same event, which the log takes once.

In production the runner hands in ``orderflow.runtime.history.MessageHistory``
(a direct get of the subject's last message, a publish that the stream
refuses a second time); in unit tests and offline replays, :class:`MemoryHistory`.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from functions.events import DELIVERY_DECISIONS, Event, subject_of

E = TypeVar("E", bound=Event)


class History(Protocol):
    async def last(self, order_id: str, kind: type[E]) -> E | None: ...

    async def append(self, event: Event) -> None: ...


class MemoryHistory:
    """A History in a dict, with the log's rules: one event per order and kind, one delivery
    decision per order, first wins."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], Event] = {}
        #: Every event appended, in order, the repeats left out.
        self.appended: list[Event] = []

    async def last(self, order_id: str, kind: type[E]) -> E | None:
        found = self.events.get((order_id, subject_of(kind)))
        return found if isinstance(found, kind) else None

    async def append(self, event: Event) -> None:
        self.record(event)

    def record(self, event: Event) -> bool:
        """Store ``event`` unless its kind is stored for the order; whether it was new."""
        key = (event.order_id, subject_of(type(event)))
        if key in self.events:
            return False
        if isinstance(event, DELIVERY_DECISIONS) and any(
            (event.order_id, subject_of(kind)) in self.events for kind in DELIVERY_DECISIONS
        ):
            return False
        self.events[key] = event
        self.appended.append(event)
        return True
