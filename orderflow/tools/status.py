"""``status``: the running system at a glance, from NATS itself.

Instances and their counters come from the NATS micro protocol (every
function process answers ``$SRV.STATS.orderflow-<name>``, see
``orderflow.runtime.metrics``); backlog and redeliveries from the consumers; dead
letters from the dead-letter stream; sizes from the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from orderflow import subjects
from orderflow.config import FunctionSpec, Topology
from orderflow.ops import interventions
from orderflow.runtime.kv import stream_name

T = TypeVar("T")

COUNTERS = ("processed", "failed", "retried", "dead_lettered")


async def ask_all(nc: Client, subject: str, wait: float = 0.3) -> list[dict[str, Any]]:
    """Every answer to ``subject`` within ``wait`` seconds (micro discovery is scatter-gather)."""
    answers: list[dict[str, Any]] = []
    nobody = asyncio.Event()

    async def collect(msg: Msg) -> None:
        if not msg.data:
            # The server's "no responders" (503): nobody is there to answer.
            nobody.set()
            return
        answers.append(json.loads(msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(subject, b"", reply=inbox, headers={})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(nobody.wait(), wait)
    await sub.unsubscribe()
    return answers


async def collect(nc: Client, topology: Topology) -> dict[str, Any]:
    # Short: a leaderless stream in a cluster would hold every row for the default 5 s.
    js = nc.jetstream(timeout=2.0)

    async def row_of(name: str, fn: FunctionSpec) -> dict[str, Any]:
        stats = await ask_all(nc, subjects.service_api("STATS", name))
        row: dict[str, Any] = {"instances": len(stats), **dict.fromkeys(COUNTERS, 0)}
        row["last_error"] = None
        for answer in stats:
            for endpoint in answer.get("endpoints", []):
                data = endpoint.get("data") or {}
                for key in COUNTERS:
                    row[key] += int(data.get(key, 0))
                row["last_error"] = data.get("last_error") or row["last_error"]
        row.update(pending=0, unacked=0, redelivered=0)
        paused_now = False
        for consumer in fn.consumers:
            info = await unless_electing(js.consumer_info(consumer.stream, consumer.durable))
            if info is None:
                row.update(pending=None, unacked=None, redelivered=None)
                break
            paused_now = paused_now or bool(info.paused)
            row["pending"] += info.num_pending or 0
            row["unacked"] += info.num_ack_pending or 0
            row["redelivered"] += info.num_redelivered or 0
        dlq = topology.dead_letters
        # Filed under the order (dlq.<ID>.<function>): the subject index counts them.
        subject = subjects.dead_letter(dlq.subject_prefix, "*", name)
        info = await unless_electing(js.stream_info(dlq.stream, subjects_filter=subject))
        row["dead_letters"] = None if info is None else sum((info.state.subjects or {}).values())
        pause = await unless_electing(interventions.pause_of(nc, topology, name, paused_now))
        row["paused"] = interventions.describe(pause) if pause else None
        return row

    # Every function at once: each waits ask_all's time for its instances' answers.
    names = list(topology.functions)
    rows = await asyncio.gather(*(row_of(n, topology.functions[n]) for n in names))
    functions = dict(zip(names, rows, strict=True))
    streams = {}
    names = [s.name for s in topology.streams] + [stream_name(b.name) for b in topology.buckets]
    for stream in names:
        info = await unless_electing(js.stream_info(stream))
        if info is None:
            streams[stream] = dict.fromkeys(("messages", "bytes", "replicas", "current", "leader"))
            continue
        state, cluster = info.state, info.cluster
        # In a cluster: how many copies, how many have caught up, who leads.
        peers = (cluster.replicas or []) if cluster else []
        leading = 1 if cluster and cluster.leader else 0
        streams[stream] = {
            "messages": state.messages,
            "bytes": state.bytes,
            "replicas": info.config.num_replicas or 1,
            "current": leading + sum(bool(p.current) for p in peers),
            "leader": cluster.leader if cluster else None,
        }
    return {"functions": functions, "streams": streams}


async def unless_electing(request: Awaitable[T]) -> T | None:
    """The answer, or None when nobody gives one: in a cluster, a stream or consumer
    that lost its leader answers nothing until another is elected (seconds)."""
    try:
        return await request
    except (TimeoutError, nats.js.errors.ServiceUnavailableError):
        return None


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def render(status: dict[str, Any]) -> str:
    head = ("FUNCTION", "INST", "PROCESSED", "FAILED", "RETRIED", "PENDING", "UNACKED",
            "REDELIV", "DEAD", "LAST ERROR")  # fmt: skip
    rows = [head]
    for name, r in status["functions"].items():
        rows.append(
            (name, str(r["instances"]), f"{r['processed']:,}", f"{r['failed']:,}",
             f"{r['retried']:,}", _n(r["pending"]), _n(r["unacked"]),
             _n(r["redelivered"]), _n(r["dead_letters"]), (r["last_error"] or "")[:60])
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines += [f"{name}: {r['paused']}" for name, r in status["functions"].items() if r["paused"]]
    lines.append("")
    lines.append(f"{'STREAM':<20} {'MESSAGES':>10} {'BYTES':>14}  {'REPLICAS':<10} LEADER")
    for stream, s in status["streams"].items():
        if s["replicas"] is None:
            lines.append(f"{stream:<20} {'?':>10} {'?':>14}  {'?':<10} none: no answer (electing?)")
            continue
        copies = f"{s['replicas']} ({s['current']} ok)" if s["replicas"] > 1 else "1"
        lines.append(
            f"{stream:<20} {s['messages']:>10,} {s['bytes']:>14,}  {copies:<10} "
            f"{s['leader'] or 'none: electing'}"
        )
    return "\n".join(lines)
