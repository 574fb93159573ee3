"""Make the server match ``streams.yaml``: streams, KV buckets, consumers, inventory.

Idempotent, and honest about drift: ``pull_subscribe`` on an existing durable
silently ignores the config it is given, so nothing here relies on it. Each
object is read back, compared field by field with what the file says, and
updated when they differ; every change is reported as ``old -> new``.
Inventory is seeded only where a SKU has no level yet: provisioning again
never resets stock that orders have consumed.

Replicas: a stream or bucket whose ``replicas`` is set in ``streams.yaml`` is
made to have that many (scaled up or down like any other drift); one that
leaves it unset is created with ``default_replicas`` (1; ``up --cluster N``
passes N) and afterwards keeps whatever it has. A count the servers cannot
place fails with the key that asked for it.

A cluster that is still forming is not such a count: its meta leader places
replicas only on peers it has had a statistics message from since their route
(re)connected, and until one comes (every 0.25 s at first, backing off to
30 s) it answers 10005 "no suitable peers for placement, peer offline", even
while ``/healthz`` is happy and ``/jsz`` shows the peer current. Provisioning
asks again until ``placement_timeout`` and only then fails, saying the
cluster never formed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import (
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from functions.state import Store, Write
from functions.stock import Level, level_key
from orderflow import subjects
from orderflow.config import (
    BucketSpec,
    ConfigError,
    StreamSpec,
    Topology,
    load_inventory,
    seconds,
)
from orderflow.runtime.consumers import Report, drift, ensure_consumers
from orderflow.runtime.kv import KvStore, stream_name


def _storage(kind: str) -> StorageType:
    return StorageType.FILE if kind == "file" else StorageType.MEMORY


def stream_config(
    spec: StreamSpec, max_msg_size: int = -1, default_replicas: int = 1
) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=_storage(spec.storage),
        num_replicas=spec.replicas or default_replicas,
        duplicate_window=seconds(spec.duplicate_window),
        max_age=seconds(spec.max_age),
        allow_msg_schedules=spec.allow_msg_schedules or None,
        allow_rollup_hdrs=spec.allow_rollup,
        allow_msg_ttl=spec.allow_msg_ttl or None,
        max_msg_size=max_msg_size,
        # Functions read an order's events by subject (orderflow/runtime/history.py).
        allow_direct=True,
    )


def bucket_config(spec: BucketSpec, default_replicas: int = 1) -> StreamConfig:
    # The stream nats-py's create_key_value would make, declared here so that
    # it is reconciled like the rest.
    return StreamConfig(
        name=stream_name(spec.name),
        subjects=[subjects.kv_key(spec.name, ">")],
        storage=_storage(spec.storage),
        num_replicas=spec.replicas or default_replicas,
        max_msgs_per_subject=spec.history,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        duplicate_window=120.0,
        max_age=0.0,  # no limit; said out loud, or the server's 0 reads as drift from None
    )


_STREAM_FIELDS = (
    "subjects",
    "storage",
    "num_replicas",
    "duplicate_window",
    "max_age",
    "max_msgs_per_subject",
    "allow_msg_schedules",
    "allow_rollup_hdrs",
    "allow_msg_ttl",
    "max_msg_size",
    "allow_direct",
)


class LayoutRefused(Exception):
    """The server holds messages this version cannot read: an older subject layout."""


async def _check_layout(js: Any, config: StreamConfig, have: StreamConfig) -> None:
    """Refuse to take over a stream whose stored messages the new subjects leave out.

    Before order ids were tokens of every subject (``orderflow/subjects.py``),
    events were stored on ``payments.succeeded`` and the like; a stream
    updated to the new subjects would keep them, unread by any consumer,
    invisible to ``trace``, and the orders they belong to could never finish.
    """
    dropped = [
        p
        for p in have.subjects or []
        if not any(config_matches(n, p) for n in config.subjects or [])
    ]
    held: dict[str, int] = {}
    for pattern in dropped:
        info = await js.stream_info(config.name, subjects_filter=pattern)
        held.update(info.state.subjects or {})
    if held:
        example = ", ".join(sorted(held)[:3])
        raise LayoutRefused(
            f"stream {config.name} holds {sum(held.values())} messages on subjects this "
            f"version does not store (e.g. {example}): they are from an older layout, "
            f"before every event was filed under its order ({', '.join(config.subjects or [])}). "
            "Nothing was changed. Start on a fresh server or store (`runner.py up --data-dir "
            f"NEW_DIR`), or delete the old stream once its orders are finished "
            f"(`nats stream rm {config.name}`), then provision again; or keep running the "
            "version that wrote it."
        )


def config_matches(pattern: str, covered: str) -> bool:
    """Whether every subject ``covered`` matches also matches ``pattern``."""
    p, c = pattern.split("."), covered.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(c) > i
        if i >= len(c) or (token not in ("*", c[i]) or c[i] == ">"):
            return False
    return len(p) == len(c)


async def ensure_stream(
    js: Any, config: StreamConfig, report: Report, keep_replicas: bool = False
) -> None:
    """Create the stream, or update it where it differs; ``keep_replicas``: leave its count."""
    fields = tuple(f for f in _STREAM_FIELDS if not (keep_replicas and f == "num_replicas"))
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        report.say(f"stream {config.name}: created")
        return
    await _check_layout(js, config, info.config)
    changes = drift(config, info.config, fields)
    if changes:
        merged = info.config
        for name in fields:
            setattr(merged, name, getattr(config, name))
        await js.update_stream(merged)
        report.say(f"stream {config.name}: updated ({'; '.join(changes)})")
    else:
        report.say(f"stream {config.name}: unchanged")


async def wait_for_leaders(js: Any, streams: list[str], timeout: float = 30.0) -> None:
    """Until every stream has a leader: a replicated stream is created before its
    replicas have elected one, and until then a publish finds no responders."""
    deadline = time.monotonic() + timeout
    for name in streams:
        while True:
            try:
                info = await js.stream_info(name)
                if info.cluster is None or info.cluster.leader:
                    break
            except TimeoutError:
                pass  # a stream without a leader may not answer at all
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {name} has no leader after {timeout}s")
            await asyncio.sleep(0.05)


class ModeSwitchRefused(Exception):
    """The other wiring still has messages in flight: switching now would strand them."""


async def retire_inactive(nc: Client, topology: Topology, report: Report) -> dict[str, int]:
    """Delete the consumers of the wiring that is not running; returns where new ones start.

    Left in place, they would pile up every new message, and switching back
    would feed orders the other wiring already finished to the functions
    again. So a switch happens only when they are idle: every message they
    were given is settled. The new wiring's consumers then start after the
    last message already in the stream, for the same reason.
    """
    js = nc.jetstream()
    active = {c.durable for fn in topology.functions.values() for c in fn.consumers}
    retired: list[tuple[str, str]] = []
    for fn in topology.inactive.values():
        for spec in fn.consumers:
            if spec.durable in active:
                continue
            try:
                info = await js.consumer_info(spec.stream, spec.durable)
            except nats.js.errors.NotFoundError:
                continue
            if info.num_pending or info.num_ack_pending:
                other = "orchestration" if topology.mode == "choreography" else "choreography"
                raise ModeSwitchRefused(
                    f"cannot switch to {topology.mode}: consumer {spec.stream}/{spec.durable} of "
                    f"the {other} wiring has {info.num_pending} messages waiting and "
                    f"{info.num_ack_pending} in flight; let them finish (run with --mode {other}) "
                    "and provision again"
                )
            retired.append((spec.stream, spec.durable))
    start_after: dict[str, int] = {}
    for stream, durable in retired:
        await js.delete_consumer(stream, durable)
        report.say(f"consumer {stream}/{durable}: removed (not in the {topology.mode} wiring)")
        start_after[stream] = (await js.stream_info(stream)).state.last_seq
    return start_after


async def seed_levels(store: Store, stock: dict[str, int]) -> int:
    """Create each SKU's level where it has none; returns how many were created."""
    seeded = 0
    for sku, units in stock.items():
        seeded += bool(await store.commit(Write(level_key(sku), Level(units), 0)))
    return seeded


async def seed_inventory(nc: Client, topology: Topology, base: Path, report: Report) -> None:
    if topology.inventory is None:
        return
    stock = load_inventory(base / topology.inventory.file)
    seeded = await seed_levels(KvStore(nc, topology.inventory.bucket), stock)
    report.say(
        f"inventory: {seeded} SKUs seeded, {len(stock) - seeded} already had a level "
        f"(from {topology.inventory.file})"
    )


#: The server's answers to a replica count it cannot place: more than the
#: cluster's servers (no suitable peers), or more than one on a lone server.
_CANNOT_PLACE = {10005, 10074}

#: Seconds provisioning waits for a forming cluster's peers to become placeable.
PLACEMENT_TIMEOUT = 30.0


def _peer_offline(exc: nats.js.errors.APIError) -> bool:
    """10005 because a peer is offline to the meta leader: not yet, rather than never."""
    return exc.err_code == 10005 and "peer offline" in (exc.description or "")


async def _ensure_replicated(
    js: Any,
    config: StreamConfig,
    report: Report,
    spec: StreamSpec | BucketSpec,
    key: str,
    placement_timeout: float = PLACEMENT_TIMEOUT,
) -> None:
    """``ensure_stream``, with a refused replica count reported against its key in the file;
    asked again while a peer is offline, until ``placement_timeout``."""
    deadline = time.monotonic() + placement_timeout
    while True:
        try:
            await ensure_stream(js, config, report, keep_replicas=spec.replicas is None)
            return
        except (TimeoutError, nats.errors.TimeoutError):
            # A forming (or busy) cluster may let a create go unanswered; asked again, an
            # identical create that did happen is answered as done.
            if time.monotonic() >= deadline:
                raise
            continue
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _CANNOT_PLACE or (config.num_replicas or 1) < 2:
                raise
            offline = _peer_offline(exc)
            if offline and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                continue
            where = f"{key}.replicas" if spec.replicas is not None else "the default replica count"
            if offline:
                raise ConfigError(
                    f"{where}: the server cannot place {config.num_replicas} replicas of "
                    f"{config.name} ({exc.description}): the cluster never formed, a server "
                    f"was still offline to the meta leader after {placement_timeout:g}s; "
                    "check that every server of the cluster is running and routed to the others"
                ) from None
            raise ConfigError(
                f"{where}: the server cannot place {config.num_replicas} replicas of "
                f"{config.name} ({exc.description}); a stream has at most one replica "
                "per server of the cluster"
            ) from None


async def provision(
    nc: Client,
    topology: Topology,
    base: Path = Path("."),
    default_replicas: int = 1,
    placement_timeout: float = PLACEMENT_TIMEOUT,
) -> Report:
    """Make the server match ``topology``; ``default_replicas`` for what sets no count;
    ``placement_timeout``: how long a forming cluster may refuse replicas (module doc)."""
    report = Report()
    js = nc.jetstream()
    for i, stream in enumerate(topology.streams):
        # limits.max_message_bytes bounds every stream but the dead letters, which
        # must take any message a stream accepted, plus the reason.
        dead_letters = stream.name == topology.dead_letters.stream
        size = -1 if dead_letters else topology.limits.max_message_bytes
        config = stream_config(stream, size, default_replicas)
        await _ensure_replicated(js, config, report, stream, f"streams[{i}]", placement_timeout)
    for i, bucket in enumerate(topology.buckets):
        config = bucket_config(bucket, default_replicas)
        await _ensure_replicated(js, config, report, bucket, f"buckets[{i}]", placement_timeout)
    names = [s.name for s in topology.streams] + [stream_name(b.name) for b in topology.buckets]
    await wait_for_leaders(js, names)
    start_after = await retire_inactive(nc, topology, report)
    for function in topology.functions:
        await ensure_consumers(nc, topology, function, report, start_after)
    await seed_inventory(nc, topology, base, report)
    return report


async def provision_at(
    url: str,
    topology: Topology,
    base: Path = Path("."),
    *,
    env: Mapping[str, str] | None = None,
    default_replicas: int = 1,
) -> Report:
    """:func:`provision` over a connection of its own (``env``: its variables, see connect)."""
    from orderflow.runtime.connect import connect

    nc = await connect(url, name="orderflow-provision", env=env)
    try:
        return await provision(nc, topology, base, default_replicas=default_replicas)
    finally:
        await nc.close()
