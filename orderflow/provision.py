"""Make the server match ``streams.yaml``: streams, KV buckets, consumers, inventory.

Idempotent, and honest about drift: ``pull_subscribe`` on an existing durable
silently ignores the config it is given, so nothing here relies on it. Each
object is read back, compared field by field with what the file says, and
updated when they differ; every change is reported as ``old -> new``.
Inventory is seeded only where a SKU has no level yet: provisioning again
never resets stock that orders have consumed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from functions.state import Store, Write
from functions.stock import Level, level_key
from orderflow.config import (
    BucketSpec,
    ConsumerSpec,
    StreamSpec,
    Topology,
    load_inventory,
    seconds,
)
from orderflow.kv import KvStore, stream_name


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)


def _storage(kind: str) -> StorageType:
    return StorageType.FILE if kind == "file" else StorageType.MEMORY


def stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=_storage(spec.storage),
        num_replicas=spec.replicas,
        duplicate_window=seconds(spec.duplicate_window),
        max_age=seconds(spec.max_age),
    )


def bucket_config(spec: BucketSpec) -> StreamConfig:
    # The stream nats-py's create_key_value would make, plus allow_atomic for
    # multi-key commits; declared here so that it is reconciled like the rest.
    return StreamConfig(
        name=stream_name(spec.name),
        subjects=[f"$KV.{spec.name}.>"],
        storage=_storage(spec.storage),
        num_replicas=spec.replicas,
        max_msgs_per_subject=spec.history,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        allow_atomic=True,
        duplicate_window=120.0,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=seconds(spec.ack_wait),
        # One more than the runner allows: the runner dead-letters a message on
        # its last attempt, and this spare delivery reaches it even when the
        # process died during that last attempt (a server-side cap alone would
        # drop the message silently).
        max_deliver=spec.max_deliver + 1,
        filter_subjects=list(spec.filter_subjects),
        max_ack_pending=spec.max_ack_pending,
    )


def _drift(want: Any, have: Any, names: Iterable[str]) -> list[str]:
    changes = []
    for name in names:
        old, new = getattr(have, name), getattr(want, name)
        if isinstance(old, float) or isinstance(new, float):
            same = old is not None and new is not None and abs(float(old) - float(new)) < 1e-6
        else:
            same = old == new
        if not same:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


_STREAM_FIELDS = (
    "subjects",
    "storage",
    "num_replicas",
    "duplicate_window",
    "max_age",
    "max_msgs_per_subject",
    "allow_atomic",
)
_CONSUMER_FIELDS = ("ack_wait", "max_deliver", "filter_subjects", "max_ack_pending")


async def ensure_stream(js: Any, config: StreamConfig, report: Report) -> None:
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        report.say(f"stream {config.name}: created")
        return
    changes = _drift(config, info.config, _STREAM_FIELDS)
    if changes:
        merged = info.config
        for name in _STREAM_FIELDS:
            setattr(merged, name, getattr(config, name))
        await js.update_stream(merged)
        report.say(f"stream {config.name}: updated ({'; '.join(changes)})")
    else:
        report.say(f"stream {config.name}: unchanged")


async def ensure_consumer(js: Any, stream: str, config: ConsumerConfig, report: Report) -> None:
    name = f"consumer {stream}/{config.durable_name}"
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(stream, config)
        report.say(f"{name}: created")
        return
    changes = _drift(config, info.config, _CONSUMER_FIELDS)
    if changes:
        await js.add_consumer(stream, config)  # create-or-update on the server
        report.say(f"{name}: updated ({'; '.join(changes)})")
    else:
        report.say(f"{name}: unchanged")


async def ensure_consumers(nc: Client, topology: Topology, function: str, report: Report) -> None:
    js = nc.jetstream()
    for spec in topology.functions[function].consumers:
        await ensure_consumer(js, spec.stream, consumer_config(spec), report)


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


async def provision(nc: Client, topology: Topology, base: Path = Path(".")) -> Report:
    report = Report()
    js = nc.jetstream()
    for stream in topology.streams:
        await ensure_stream(js, stream_config(stream), report)
    for bucket in topology.buckets:
        await ensure_stream(js, bucket_config(bucket), report)
    for function in topology.functions:
        await ensure_consumers(nc, topology, function, report)
    await seed_inventory(nc, topology, base, report)
    return report
