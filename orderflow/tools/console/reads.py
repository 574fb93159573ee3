"""What the console reads beyond the command line's tools: the flow now, and recent orders.

Nothing here scans the history. Counts over the last minute come from the
server's subject index: one batch direct get from a start time returns the
first match and how many follow it. Recent orders are read from the newest
time window that holds enough of them, widening from 10 s to 30 days.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from nats.aio.client import Client

from functions.events import OrderCreated
from orderflow import subjects
from orderflow.config import Topology
from orderflow.tools import status
from orderflow.tools.streamlog import Stored, direct_batch

#: Windows tried for "recent", newest first.
WINDOWS_S = (10, 60, 600, 3600, 86400, 30 * 86400)
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


async def since(nc: Client, stream: str, subject_filter: str, start: datetime) -> int:
    """How many messages on ``subject_filter`` were stored at or after ``start``."""
    found, pending = await direct_batch(
        nc, stream, {"start_time": _rfc3339(start), "next_by_subj": subject_filter, "batch": 1}
    )
    return len(found) + pending if found else 0


async def snapshot(nc: Client, topology: Topology, now: datetime) -> Snapshot:
    figures = await status.collect(nc, topology)
    minute_ago = now - timedelta(minutes=1)
    kinds = sorted({kind for kind, _ in edges(topology)})

    async def count(kind: str) -> int:
        filters = subjects.filters(kind)
        return sum(await asyncio.gather(*(since(nc, _stream_of(topology, kind), f, minute_ago)
                                          for f in filters)))  # fmt: skip

    counts = dict(zip(kinds, await asyncio.gather(*(count(k) for k in kinds)), strict=True))
    return Snapshot(
        taken=now,
        mode=topology.mode,
        functions=figures["functions"],
        edges={edge_name(kind, fn): counts[kind] for kind, fn in edges(topology)},
    )


def _stream_of(topology: Topology, kind: str) -> str:
    """The stream a kind is read from (the alarms' is not the orders')."""
    for fn in topology.functions.values():
        for consumer in fn.consumers:
            if kind in consumer.events:
                return consumer.stream
    return topology.events_stream


# --- recent orders ---------------------------------------------------------------


async def recent(nc: Client, topology: Topology, kind: str, now: datetime,
                 limit: int = LIST_LIMIT) -> list[Stored]:  # fmt: skip
    """The newest messages of ``kind`` (every order's), newest first, at most ``limit``."""
    stream = _stream_of(topology, kind)
    filters = subjects.filters(kind)
    for window in WINDOWS_S:
        start = now - timedelta(seconds=window)
        total = sum([await since(nc, stream, f, start) for f in filters])
        if total >= limit or window == WINDOWS_S[-1]:
            break
    found: list[Stored] = []
    for subject_filter in filters:
        request = {"start_time": _rfc3339(start), "next_by_subj": subject_filter,
                   "batch": min(max(total, 1), 4 * limit)}  # fmt: skip
        found += (await direct_batch(nc, stream, request))[0]
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


async def by_customer(nc: Client, topology: Topology, customer_id: str, now: datetime,
                      among: int = 500) -> tuple[list[str], int]:  # fmt: skip
    """Orders of ``customer_id`` among the newest ``among`` orders, and how many were looked at."""
    created = await recent(nc, topology, subjects.INGRESS, now, limit=among)
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


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
