"""The loop of one function process: pull, decode, handle, publish, ack.

Messages come from ``orderflow.runtime.pull`` (asked for ahead, up to the function's
concurrency, each started the moment it arrives). For every message, in this
order:

1. delivered more often than the function allows -> dead letter (the processes
   handling it kept dying: a poison message must not crash-loop forever);
2. too large, undecodable, invalid or over ``limits`` -> dead letter at once (retrying cannot
   fix bytes), and an ``orders.rejected`` where the function answers those;
3. call the handler with the decoded Struct and the order's history as this
   message sees it (``orderflow.runtime.history``: reads, and appends it may make
   before reading on);
4. emit what it returned (``orderflow.runtime.emit``: on the order's subject, with the
   context headers, refused by the stream if the order has that kind
   already), and wait for every publish ack;
5. only then ack the input.

A process killed anywhere in between leaves the input unacked: it comes back
after ``ack_wait``, the handler finds its own earlier effects (in the order's
history, in KV) and answers the same, and the stream refuses the repeats.

A handler exception is a transient fault: the message is handed back with
``nak(delay)`` from the function's backoff schedule (a plain nak would
redeliver at once, and the consumer ``backoff`` list applies only to ack
timeouts), until its last attempt, when it is dead-lettered with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.errors import Permanent, Retry
from functions.events import Event, OrderRejected, event_id, subject_of
from functions.history import History
from orderflow import subjects
from orderflow.config import ConsumerSpec, FunctionSpec, Topology, seconds
from orderflow.runtime.context import CAUSATION_ID, CORRELATION_ID, FUNCTION, input_event_id
from orderflow.runtime.deadletter import DeadLetters
from orderflow.runtime.decoding import Invalid, claimed_order_id, decode
from orderflow.runtime.emit import Emitter
from orderflow.runtime.failpoints import crash_point
from orderflow.runtime.history import MessageHistory, OrderLog
from orderflow.runtime.logs import fields
from orderflow.runtime.metrics import Counters
from orderflow.runtime.pull import Puller

Handler = Callable[[Event, History], Awaitable[Sequence[Event]]]
#: The messages in hand, by reply subject (unique per delivery): the message and
#: when the server last heard from us about it.
Held = dict[str, tuple[Msg, float]]


class RetryNote(msgspec.Struct, frozen=True):
    """One failed attempt, as noted in the retry log."""

    function: str
    subject: str
    order_id: str
    sequence: int
    attempt: int
    delay_s: float
    error: str


log = logging.getLogger("orderflow.runtime.worker")

_encoder = msgspec.json.Encoder()


class Worker:
    def __init__(
        self,
        nc: Client,
        topology: Topology,
        function: str,
        handler: Handler,
        leader_reads: bool = False,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = function
        self.spec: FunctionSpec = topology.functions[function]
        self.handler = handler
        self.emitter = Emitter(nc, function, self.spec.emits)
        self.reads = frozenset(self.spec.reads)
        # An order's history lives where its events are stored.
        self.log = OrderLog(nc, topology.events_stream, leader_only=leader_reads)
        self.dead_letters = DeadLetters(nc, topology.dead_letters, function)
        self.max_payload = topology.dead_letters.max_payload
        self.limits = topology.limits
        self.retry_log = topology.retry_log
        self.counters = Counters()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume every binding until ``stop`` is set, then finish what is in hand."""
        await asyncio.gather(*(self._consume(spec, stop) for spec in self.spec.consumers))

    async def _consume(self, consumer: ConsumerSpec, stop: asyncio.Event) -> None:
        # Messages in hand, each its own task: a slow one (a gateway timeout,
        # a compare-and-set retry) holds one slot, not the whole batch.
        in_hand: set[asyncio.Task[None]] = set()
        held: Held = {}
        keeper = asyncio.create_task(_keep_alive(held, seconds(consumer.ack_wait)))

        def start(msg: Msg) -> None:
            task = asyncio.create_task(self.process(msg, consumer, held))
            in_hand.add(task)
            task.add_done_callback(settled)

        def settled(task: asyncio.Task[None]) -> None:
            in_hand.discard(task)
            puller.done()

        puller = Puller(
            self.nc, consumer.stream, consumer.durable, self.spec.concurrency, deliver=start
        )
        try:
            # Every message handed over is seen through, even after stop is set:
            # handing it back unacked would only delay it by ack_wait.
            await puller.run(stop)
        finally:
            keeper.cancel()

    async def process(self, msg: Msg, consumer: ConsumerSpec, held: Held) -> None:
        held[msg.reply] = (msg, time.monotonic())  # from now on _keep_alive vouches for it
        try:
            await self._process(msg, consumer)
        except Exception:
            # Publishing, acking or dead-lettering failed (the server went
            # away): the message stays unacked and comes back after ack_wait.
            log.warning("%s: could not settle %s", self.name, msg.subject, exc_info=True)
        finally:
            del held[msg.reply]

    async def _process(self, msg: Msg, consumer: ConsumerSpec) -> None:
        attempt = msg.metadata.num_delivered
        if attempt > consumer.max_deliver:
            # First, before anything that could fail again: whatever kept this
            # message from being settled (a process dying on it, a bug), it
            # ends here, in the dead letters, not in an endless loop.
            reason = (
                f"delivered {attempt} times (max_deliver {consumer.max_deliver}) without an answer"
            )
            await self._dead_letter(msg, reason)
            return
        event = decode(msg.subject, msg.data, self.max_payload, self.limits)
        if isinstance(event, Invalid):
            if event.rejectable:
                await self._reject(msg, event.reason)
            else:
                await self._dead_letter(msg, event.reason)
            return
        meta = msg.metadata
        input_id = input_event_id(msg.headers or {}, meta.stream, meta.sequence.stream)
        context = fields(self.name, msg.subject, event.order_id, input_id)
        started = time.perf_counter_ns()
        kind = subject_of(type(event))
        history = MessageHistory(self.log, self.emitter, msg, self.reads)
        try:
            emitted = await self.handler(event, history)
            crash_point("after-handle", self.name, event.order_id, kind)
            await self._publish(emitted, history)
            crash_point("after-publish", self.name, event.order_id, kind)
        except Permanent as exc:
            self._failed(exc)
            await self._dead_letter(msg, f"permanent failure: {exc}")
            return
        except Exception as exc:
            self._failed(exc)
            if attempt >= consumer.max_deliver:
                reason = f"failed {attempt} attempts; last error: {type(exc).__name__}: {exc}"
                await self._dead_letter(msg, reason)
                return
            delay = exc.defer if isinstance(exc, Retry) and exc.defer is not None else None
            delay = self.spec.retry.delay(attempt) if delay is None else delay
            log.warning(
                "%s: %s for order %s failed (attempt %d), retrying in %.2fs: %s: %s",
                self.name, kind, event.order_id, attempt, delay, type(exc).__name__, exc,
                extra=context,
            )  # fmt: skip
            await msg.nak(delay=delay)
            self.counters.retried += 1
            await self._note_retry(msg, event, delay, exc)
            return
        await msg.ack()
        self.counters.processed += 1
        self.counters.processing_ns += time.perf_counter_ns() - started
        if log.isEnabledFor(logging.DEBUG):
            outputs = ", ".join(subject_of(type(e)) for e in emitted) or "nothing"
            log.debug("%s: %s for order %s -> %s", self.name, kind, event.order_id,
                      outputs, extra=context)  # fmt: skip

    def _failed(self, exc: Exception) -> None:
        self.counters.failed += 1
        self.counters.last_error = f"{type(exc).__name__}: {exc}"[:500]

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        await self.dead_letters.add(msg, reason)
        self.counters.dead_lettered += 1

    async def _reject(self, msg: Msg, reason: str) -> None:
        """Dead-letter an input that can never be handled; tell its publisher when we can."""
        if subjects.kind_of(msg.subject) in self.spec.reject_invalid:
            order_id = subjects.parse(msg.subject)[0] or claimed_order_id(msg.data)
            if order_id is not None:
                meta = msg.metadata
                rejection = OrderRejected(order_id, reason=reason[:500])
                # One rejection per rejected message, however often it is delivered.
                rejection_id = f"orders.rejected:{meta.stream}:{meta.sequence.stream}"
                await self.emitter.emit(rejection, msg, message_id=rejection_id)
        await self._dead_letter(msg, reason)

    async def _publish(self, events: Sequence[Event], history: MessageHistory) -> None:
        self.emitter.check(events)
        # Concurrently: the input is acked only once every ack is in.
        await asyncio.gather(
            *(
                self.emitter.emit(event, history.cause)
                for event in events
                if event_id(event) not in history.appended
            )
        )

    async def _note_retry(self, msg: Msg, event: Event, delay: float, exc: Exception) -> None:
        """Put the failed attempt in the log, for ``trace``; best effort, never in the way."""
        if self.retry_log is None:
            return
        meta = msg.metadata
        note = RetryNote(
            function=self.name,
            subject=msg.subject,
            order_id=event.order_id,
            sequence=meta.sequence.stream,
            attempt=meta.num_delivered,
            delay_s=delay,
            error=f"{type(exc).__name__}: {exc}"[:500],
        )
        cause_headers = msg.headers or {}
        headers = {
            CORRELATION_ID: event.order_id,
            CAUSATION_ID: input_event_id(cause_headers, meta.stream, meta.sequence.stream),
            FUNCTION: self.name,
        }
        try:
            await self.js.publish(
                subjects.retry_note(self.retry_log.subject_prefix, event.order_id, self.name),
                _encoder.encode(note),
                headers=headers,
            )
        except Exception as exc:  # the retry itself is already scheduled
            log.debug("%s: could not note a retry: %r", self.name, exc)


async def _keep_alive(held: Held, ack_wait: float) -> None:
    """Tell the server we are still on every message held for half its ``ack_wait``.

    Without this a handler slower than ack_wait would see its message
    redelivered to another process while it still works on it. One timer per
    consumer, not one per message: a task and a timed wait per message cost
    25 us against 4 us for a plain await (measured), ~5 % of order's CPU.
    Checking every quarter of ack_wait, a message is vouched for at the latest
    3/4 of ack_wait after the last word.
    """
    every = ack_wait / 2
    while True:
        await asyncio.sleep(every / 2)
        now = time.monotonic()
        for reply, (msg, since) in list(held.items()):
            if now - since >= every and reply in held:  # (still in hand after the awaits)
                held[reply] = (msg, now)
                with contextlib.suppress(Exception):  # the server is away: nothing to tell
                    await msg.in_progress()
