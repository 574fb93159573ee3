"""What the console reads beyond the command line's tools: the flow now, and recent orders.

Nothing here scans the history. Counts over the last minute are kept as
messages are stored (:class:`EdgeCounts`): a batch direct get from a
sequence returns the first match and how many follow it, by the server's
subject index. Recent orders are read from the end of the stream, looking
back at most :data:`LOOK_BACK_MAX` messages.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec
from nats.aio.client import Client

from functions.events import OrderCreated
from orderflow import subjects
from orderflow.config import Topology
from orderflow.tools import status
from orderflow.tools.streamlog import Stored, direct_batch, matches_between

#: Orders a list shows at most.
LIST_LIMIT = 50


@dataclass
class Snapshot:
    """The flow now: each function's figures and each edge's events in the last minute."""

    taken: datetime
    mode: str
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: dict[str, int] = field(default_factory=dict)  # "<kind> -> <function>": events

    def as_json(self) -> dict[str, Any]:
        return {"taken": self.taken.isoformat(), "mode": self.mode,
                "functions": self.functions, "edges": self.edges}  # fmt: skip


def edges(topology: Topology) -> list[tuple[str, str]]:
    """(kind, function) for every consumer filter of the running mode, as ``map`` draws them."""
    return [
        (kind, name)
        for name, fn in topology.functions.items()
        for consumer in fn.consumers
        for kind in consumer.events
    ]


def edge_name(kind: str, function: str) -> str:
    return f"{kind} -> {function}"


class EdgeCounts:
    """Events of each kind over the last minute, counted as they are stored.

    Each snapshot counts only what was stored since the one before, by
    sequence (the matches from the last sequence seen, less those past the
    stream's end as read first): what it costs is the new messages', never the
    history's, whatever its timestamps. For its first minute the console says
    what it has seen since it started.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.kinds = sorted({kind for kind, _ in edges(topology)})
        self._seen: dict[str, int] = {}  # stream -> the last sequence counted
        self._window: deque[tuple[datetime, dict[str, int]]] = deque()

    async def update(self, nc: Client, now: datetime) -> dict[str, int]:
        streams = {_stream_of(self.topology, k) for k in self.kinds}
        js = nc.jetstream()
        ends = {s: int((await js.stream_info(s)).state.last_seq) for s in streams}
        fresh: dict[str, int] = {}
        for kind in self.kinds:
            stream = _stream_of(self.topology, kind)
            if stream not in self._seen:
                continue  # the first look: counting starts here
            first, end = self._seen[stream] + 1, ends[stream]
            counts = await asyncio.gather(*(
                matches_between(nc, stream, f, first, end) for f in subjects.filters(kind)
            ))  # fmt: skip
            fresh[kind] = sum(counts)
        self._seen.update(ends)
        self._window.append((now, fresh))
        while self._window and self._window[0][0] < now - timedelta(minutes=1):
            self._window.popleft()
        return {k: sum(c.get(k, 0) for _, c in self._window) for k in self.kinds}


async def snapshot(nc: Client, topology: Topology, now: datetime, counts: EdgeCounts) -> Snapshot:
    figures, per_kind = await asyncio.gather(status.collect(nc, topology), counts.update(nc, now))
    return Snapshot(
        taken=now,
        mode=topology.mode,
        functions=figures["functions"],
        edges={edge_name(kind, fn): per_kind.get(kind, 0) for kind, fn in edges(topology)},
    )


def _stream_of(topology: Topology, kind: str) -> str:
    """The stream a kind is stored in (the alarms' is not the orders')."""
    return topology.stream_of(subjects.filters(kind)[0])


# --- recent orders ---------------------------------------------------------------
#
# "Recent" is read from the end of the stream by sequence: from LOOK_BACK
# messages before the last, then eight times as far, up to LOOK_BACK_MAX.
# The server finds a filter's matches in that range by its per-block subject
# index, so the cost is the range's, never the history's; a kind rarer than
# that range holds is shown as "none among the last N messages".

#: Messages looked back first, and at most.
LOOK_BACK = 2_500
LOOK_BACK_MAX = 160_000


async def recent(
    nc: Client, topology: Topology, kind: str, limit: int = LIST_LIMIT
) -> list[Stored]:
    """The newest messages of ``kind`` (every order's), newest first, at most ``limit``: by
    sequence, not by time (a history's timestamps may be dense or sparse)."""
    stream = _stream_of(topology, kind)
    info = await nc.jetstream().stream_info(stream)
    last = int(info.state.last_seq)
    back = LOOK_BACK
    while True:
        start = max(1, last - back)
        found: list[Stored] = []
        for subject_filter in subjects.filters(kind):
            request = {"seq": start, "next_by_subj": subject_filter, "batch": 4 * limit}
            found += (await direct_batch(nc, stream, request))[0]
        if len(found) >= limit or start == 1 or back >= LOOK_BACK_MAX:
            break
        back *= 8
    found.sort(key=lambda s: s.sequence, reverse=True)
    return found[:limit]


class _Claimed(msgspec.Struct):
    order_id: str = ""
    customer_id: str = ""


_claimed = msgspec.json.Decoder(_Claimed)


def order_id_of(stored: Stored) -> str:
    order_id = subjects.parse(stored.subject)[0]
    if order_id:
        return order_id
    try:
        return _claimed.decode(stored.data).order_id
    except msgspec.DecodeError:
        return ""


async def by_customer(
    nc: Client, topology: Topology, customer_id: str, among: int = 500
) -> tuple[list[str], int]:
    """Orders of ``customer_id`` among the newest ``among`` orders, and how many were looked at."""
    created = await recent(nc, topology, subjects.INGRESS, limit=among)
    ids = []
    for stored in created:
        try:
            claimed = _claimed.decode(stored.data)
        except msgspec.DecodeError:
            continue
        if claimed.customer_id == customer_id:
            ids.append(order_id_of(stored))
    return ids, len(created)


def decode_order(stored: Stored) -> OrderCreated | None:
    try:
        return msgspec.json.decode(stored.data, type=OrderCreated)
    except msgspec.DecodeError:
        return None
