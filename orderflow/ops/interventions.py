"""An operator's interventions in a running flow, each one recorded: pause and resume a function,
cancel an order.

Pausing uses the server's own consumer pause (nats-server 2.11+): the
function's durable consumers stop delivering until a time (or until
resumed), nothing is lost, nothing is redelivered meanwhile, no process
needs to stop, and what was in hand when it paused is seen through. Its
backlog simply waits. The processes keep asking, so delivery resumes the
moment the pause ends.

Every intervention is also an :class:`Intervention` record on
``interventions.function.<name>`` in the interventions stream (who, what,
when, why), so ``status``, ``trace`` and ``stuck`` can say a function is
paused and since when, and nothing rewrites history. Who: the connecting
user (``NATS_USER``, or the credentials file's name), else the operating
system's user.

Cancelling asks the ``cancel`` function (``orders.cancel``, functions/cancel.py),
which records the request and its answer on ``interventions.order.<ID>``
(whoever asked: a storefront may not write records), where ``trace`` shows it
on the order's timeline. A request that gets no
answer (no process listening, or the one handling it died) is asked again,
as the same request, a few times: whatever was decided meanwhile is the answer.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client

from functions.events import CANCEL_SUBJECT, CancelAnswer, CancelRequest
from orderflow import subjects
from orderflow.config import ConfigError, Topology
from orderflow.runtime import direct
from orderflow.runtime.intervened import Intervention, rfc3339
from orderflow.runtime.requests import Problem

__all__ = ["Intervention", "NoAnswer", "cancel", "pause", "paused", "resume"]

#: "Until resumed": the server wants a time, so one far enough away.
INDEFINITELY = timedelta(days=365 * 100)


#: Times a cancellation is asked before giving up, and how long each waits.
CANCEL_ATTEMPTS = 3
CANCEL_TIMEOUT = 5.0


class NoAnswer(Exception):
    """No ``cancel`` process answered (none runs, or each attempt timed out)."""


@dataclass(frozen=True)
class Paused:
    """A function's pause as the server and the record say it."""

    function: str
    since: str  # when the pause was asked for ("" if no record says)
    until: str  # when it ends by itself ("" if until resumed)
    by: str
    reason: str


def who(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    if user := env.get("NATS_USER"):
        return user
    if creds := env.get("NATS_CREDS"):
        return Path(creds).stem
    return getpass.getuser()


def consumers_of(topology: Topology, function: str) -> list[tuple[str, str]]:
    """(stream, durable) of each of ``function``'s consumers; a clear error if no such function."""
    if function not in topology.functions:
        raise ConfigError(
            f"no function {function!r} in {topology.mode} mode "
            f"(functions: {', '.join(topology.functions)})"
        )
    return [(c.stream, c.durable) for c in topology.functions[function].consumers]


async def _record(nc: Client, topology: Topology, record: Intervention) -> None:
    log = topology.interventions
    if log is None:
        raise ConfigError("interventions: not set in streams.yaml, so nothing could record this")
    subject = subjects.intervention_on_function(log.subject_prefix, record.function)
    await nc.jetstream().publish(subject, msgspec.json.encode(record), stream=log.stream)


async def cancel(
    nc: Client,
    topology: Topology,
    request: CancelRequest,
    attempts: int = CANCEL_ATTEMPTS,
    timeout: float = CANCEL_TIMEOUT,
) -> CancelAnswer:
    """Ask for ``request``'s order to be cancelled; the answer (which the cancel function
    records)."""
    body = msgspec.json.encode(request)
    problem = "no process answered"
    for _ in range(attempts):
        try:
            reply = await nc.request(CANCEL_SUBJECT, body, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            problem = f"no answer ({type(exc).__name__})"
            await asyncio.sleep(0.2)
            continue
        raw = msgspec.json.decode(reply.data)
        if "error" in raw:
            error = msgspec.convert(raw, Problem).error
            if error.startswith("invalid request"):
                raise ConfigError(error)
            problem = error  # the handler failed: asked again
            continue
        return msgspec.convert(raw, CancelAnswer)
    raise NoAnswer(f"cancel {request.order_id}: {problem} after {attempts} attempts")


async def pause(
    nc: Client,
    topology: Topology,
    function: str,
    until: datetime | None,
    reason: str,
    now: datetime,
    by: str,
) -> Intervention:
    """Pause every consumer of ``function`` until ``until`` (None: until resumed)."""
    consumers = consumers_of(topology, function)
    ends = until or now + INDEFINITELY
    if ends <= now:
        raise ConfigError(f"--until {rfc3339(ends)}: that is not in the future")
    record = Intervention("pause", function, by, rfc3339(now), reason,
                          rfc3339(until) if until else "")  # fmt: skip
    await _record(nc, topology, record)  # first: the record never misses a pause
    js = nc.jetstream()
    for stream, durable in consumers:
        await js.pause_consumer(stream, durable, rfc3339(ends))
    return record


async def resume(
    nc: Client, topology: Topology, function: str, reason: str, now: datetime, by: str
) -> Intervention:
    consumers = consumers_of(topology, function)
    js = nc.jetstream()
    for stream, durable in consumers:
        await js.resume_consumer(stream, durable)
    record = Intervention("resume", function, by, rfc3339(now), reason)
    await _record(nc, topology, record)
    return record


async def last_record(nc: Client, topology: Topology, function: str) -> Intervention | None:
    log = topology.interventions
    if log is None:
        return None
    subject = subjects.intervention_on_function(log.subject_prefix, function)
    reply = await nc.request(f"{subjects.direct_get(log.stream)}.{subject}", b"", timeout=5.0)
    msg = direct.found(reply, f"{log.stream}: reading {subject}")
    return None if msg is None else msgspec.json.decode(msg.data, type=Intervention)


async def paused(nc: Client, topology: Topology, function: str) -> Paused | None:
    """The function's pause, if any of its consumers is paused now."""
    js = nc.jetstream()
    infos = [await js.consumer_info(s, d) for s, d in consumers_of(topology, function)]
    return await pause_of(nc, topology, function, any(info.paused for info in infos))


async def pause_of(
    nc: Client, topology: Topology, function: str, paused_now: bool
) -> Paused | None:
    """What the record says of a pause the caller saw in the consumers' info (``paused_now``),
    for callers that read that info anyway."""
    if not paused_now:
        return None
    record = await last_record(nc, topology, function)
    if record is None or record.action != "pause":
        return Paused(function, "", "", "", "")
    return Paused(function, record.at, record.until, record.by, record.reason)


def describe(pause: Paused) -> str:
    since = f" since {pause.since}" if pause.since else ""
    until = f" until {pause.until}" if pause.until else " until resumed"
    by = f" by {pause.by}" if pause.by else ""
    why = f": {pause.reason}" if pause.reason else ""
    return f"PAUSED{since}{until}{by}{why}"
