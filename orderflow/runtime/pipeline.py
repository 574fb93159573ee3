"""One message through one function: what becomes of it, decided the same way live and offline.

The worker (``orderflow.runtime.worker``) and the offline replay
(``orderflow.tools.replay``) both put every message through these steps and
differ only in what they do with the answer (publish and ack, or queue it in
memory):

1. delivered more often than the function allows -> :class:`DeadLetter` (the
   processes handling it kept dying: a poison message must not crash-loop);
2. too large, undecodable, invalid or over ``limits`` -> :class:`DeadLetter`
   at once (retrying cannot fix bytes), with an ``orders.rejected`` to
   answer where the function answers those; an older schema version is
   upgraded first (``orderflow.runtime.decoding``);
3. the handler, given the decoded event and the order's history ->
   :class:`Emit` of what it returned, checked against the function's
   ``emits`` (anything else is a bug: a permanent failure);
4. a handler that raised -> :class:`Again` (a transient fault, tried again
   on the backoff schedule), or :class:`DeadLetter` on its last attempt or
   when it raised :class:`~functions.errors.Permanent`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from functions.errors import Permanent
from functions.events import Event, OrderRejected
from functions.history import History
from orderflow import subjects
from orderflow.config import FunctionSpec
from orderflow.limits import Limits
from orderflow.runtime.decoding import Invalid, claimed_order_id, decode
from orderflow.runtime.emit import check_emits

Handler = Callable[[Event, History], Awaitable[Sequence[Event]]]


@dataclass(frozen=True)
class Emit:
    """Store these events (the input's answer), then settle the input."""

    event: Event
    events: Sequence[Event]


@dataclass(frozen=True)
class DeadLetter:
    """Give the input up, with the reason; answer ``rejection`` where there is one."""

    reason: str
    rejection: OrderRejected | None = None
    error: Exception | None = None  # what the handler raised, if it was that


@dataclass(frozen=True)
class Again:
    """A transient fault: hand the input back to be tried again later."""

    event: Event
    error: Exception


Outcome = Emit | DeadLetter | Again


def admit(
    spec: FunctionSpec,
    subject: str,
    data: bytes,
    headers: Mapping[str, str],
    attempt: int,
    max_deliver: int,
    limits: Limits,
    max_payload: int,
) -> Event | DeadLetter:
    """Steps 1 and 2: the decoded event (at the current version of its schema), or why the
    message is given up at once."""
    if attempt > max_deliver:
        return DeadLetter(
            f"delivered {attempt} times (max_deliver {max_deliver}) without an answer"
        )
    event = decode(subject, data, headers, max_payload, limits)
    if not isinstance(event, Invalid):
        return event
    rejection = None
    if event.rejectable and subjects.kind_of(subject) in spec.reject_invalid:
        order_id = subjects.parse(subject)[0] or claimed_order_id(data)
        if order_id is not None:
            rejection = OrderRejected(order_id, reason=event.reason[:500])
    return DeadLetter(event.reason, rejection)


async def handle(
    function: str,
    spec: FunctionSpec,
    handler: Handler,
    event: Event,
    history: History,
    attempt: int,
    max_deliver: int,
) -> Outcome:
    """Steps 3 and 4."""
    try:
        emitted = await handler(event, history)
        check_emits(function, spec.emits, emitted)
    except Exception as exc:
        return failure(event, exc, attempt, max_deliver)
    return Emit(event, emitted)


def failure(event: Event, exc: Exception, attempt: int, max_deliver: int) -> DeadLetter | Again:
    """What a failed attempt at ``event`` comes to (also one whose answer could not be stored)."""
    if isinstance(exc, Permanent):
        return DeadLetter(f"permanent failure: {exc}", error=exc)
    if attempt >= max_deliver:
        reason = f"failed {attempt} attempts; last error: {type(exc).__name__}: {exc}"
        return DeadLetter(reason, error=exc)
    return Again(event, exc)


def reason_class(reason: str) -> str:
    """What a dead letter's reason (as made above) comes to, in a word: the label of the
    exporter's dead letters and a dead-lettered span's ``error.type``. Anything that is
    not one of the three kinds of failure was refused at admission (step 2)."""
    if reason.startswith("delivered ") and "max_deliver" in reason:
        return "max_deliver"
    if reason.startswith("permanent failure:"):
        return "permanent"
    if reason.startswith("failed ") and "attempts; last error:" in reason:
        return "retries_exhausted"
    return "invalid"
