"""A function's durable consumers, made to match ``streams.yaml`` before it consumes.

``pull_subscribe`` on an existing durable silently ignores the config it is
given, so a changed ``ack_wait`` or filter in ``streams.yaml`` would never
reach the server. Every function process (and ``provision``) reads each of
its consumers back, compares it field by field with the file, and updates
it when they differ, reporting every change as ``old -> new``. Under
``--secure`` a function may read its consumers but not change them: the
update is refused and the admin's ``provision`` is what makes them match.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from orderflow import subjects
from orderflow.config import ConsumerSpec, Topology, seconds


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)


def consumer_config(spec: ConsumerSpec, start_after: int = 0) -> ConsumerConfig:
    """``start_after``: the stream sequence a new consumer starts past (0: from the start)."""
    return ConsumerConfig(
        durable_name=spec.durable,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_after else DeliverPolicy.ALL,
        opt_start_seq=start_after + 1 if start_after else None,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=seconds(spec.ack_wait),
        # One more than the runner allows: the runner dead-letters a message on
        # its last attempt, and this spare delivery reaches it even when the
        # process died during that last attempt (a server-side cap alone would
        # drop the message silently).
        max_deliver=spec.max_deliver + 1,
        filter_subjects=[s for kind in spec.events for s in subjects.filters(kind)],
        max_ack_pending=spec.max_ack_pending,
    )


def drift(want: Any, have: Any, names: Iterable[str]) -> list[str]:
    changes = []
    for name in names:
        old, new = getattr(have, name), getattr(want, name)
        if isinstance(old, float) or isinstance(new, float):
            same = old is not None and new is not None and abs(float(old) - float(new)) < 1e-6
        elif (old is None or old is False) and (new is None or new is False):
            same = True  # a flag left out is off: the server may or may not echo it
        else:
            same = old == new
        if not same:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


CONSUMER_FIELDS = ("ack_wait", "max_deliver", "filter_subjects", "max_ack_pending")


async def ensure_consumer(js: Any, stream: str, config: ConsumerConfig, report: Report) -> None:
    name = f"consumer {stream}/{config.durable_name}"
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(stream, config)
        start = f" (from sequence {config.opt_start_seq})" if config.opt_start_seq else ""
        report.say(f"{name}: created{start}")
        return
    changes = drift(config, info.config, CONSUMER_FIELDS)
    if changes:
        await js.add_consumer(stream, config)  # create-or-update on the server
        report.say(f"{name}: updated ({'; '.join(changes)})")
    else:
        report.say(f"{name}: unchanged")


async def ensure_consumers(
    nc: Client,
    topology: Topology,
    function: str,
    report: Report,
    start_after: dict[str, int] | None = None,
) -> None:
    """Create or update ``function``'s consumers; new ones start past ``start_after[stream]``."""
    js = nc.jetstream()
    for spec in topology.functions[function].consumers:
        start = (start_after or {}).get(spec.stream, 0)
        await ensure_consumer(js, spec.stream, consumer_config(spec, start), report)
