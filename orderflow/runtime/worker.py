"""The loop of one function process: pull, decode, handle, publish, ack.

Messages come from ``orderflow.runtime.pull`` (asked for ahead, up to the
function's concurrency, each started the moment it arrives). Each goes
through ``orderflow.runtime.pipeline`` (the steps the offline replay takes
too), with the order's history as this message sees it
(``orderflow.runtime.history``: reads, and appends a handler may make before
reading on); then, by what the pipeline says:

* emit: publish what the handler returned (``orderflow.runtime.emit``: on the
  order's subject, with the context headers, refused by the stream if the
  order has that kind already), wait for every publish ack, and only then
  ack the input;
* dead letter: file the input with the reason (and answer an invalid order
  on ``orders.rejected``), then ack it;
* again: hand it back with a delay.

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
from collections.abc import Sequence

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.events import Event, event_id, subject_of
from orderflow import subjects
from orderflow.config import ConsumerSpec, FunctionSpec, Topology, seconds
from orderflow.runtime import pipeline
from orderflow.runtime.context import CAUSATION_ID, CORRELATION_ID, FUNCTION, input_event_id
from orderflow.runtime.deadletter import DeadLetters
from orderflow.runtime.emit import Cause, Emitter
from orderflow.runtime.failpoints import crash_point
from orderflow.runtime.history import MessageHistory, OrderLog
from orderflow.runtime.logs import fields
from orderflow.runtime.metrics import Counters
from orderflow.runtime.pipeline import Handler
from orderflow.runtime.pull import Puller
from orderflow.runtime.tracing import OFF, Tracer

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
        counters: Counters | None = None,
        tracer: Tracer = OFF,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = function
        self.spec: FunctionSpec = topology.functions[function]
        self.handler = handler
        self.tracer = tracer
        self.emitter = Emitter(nc, function, self.spec.emits, tracer)
        self.reads = frozenset(self.spec.reads)
        # An order's history lives where its events are stored.
        self.log = OrderLog(nc, topology.events_stream, leader_only=leader_reads)
        self.dead_letters = DeadLetters(nc, topology.dead_letters, function)
        self.max_payload = topology.dead_letters.max_payload
        self.limits = topology.limits
        self.retry_log = topology.retry_log
        self.counters = counters or Counters()

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
            with self.tracer.processing(msg, consumer):
                await self._process(msg, consumer)
        except Exception:
            # Publishing, acking or dead-lettering failed (the server went
            # away): the message stays unacked and comes back after ack_wait.
            log.warning("%s: could not settle %s", self.name, msg.subject, exc_info=True)
        finally:
            del held[msg.reply]

    async def _process(self, msg: Msg, consumer: ConsumerSpec) -> None:
        attempt = msg.metadata.num_delivered
        admitted = pipeline.admit(
            self.spec, msg.subject, msg.data, msg.headers or {}, attempt, consumer.max_deliver,
            self.limits, self.max_payload,
        )  # fmt: skip
        if isinstance(admitted, pipeline.DeadLetter):
            await self._give_up(msg, admitted)
            return
        event = admitted
        cause = Cause.of(msg)
        context = fields(self.name, msg.subject, event.order_id, cause.id)
        started = time.perf_counter_ns()
        kind = subject_of(type(event))
        history = MessageHistory(self.log, self.emitter, cause, self.reads)
        outcome = await pipeline.handle(
            self.name, self.spec, self.handler, event, history, attempt, consumer.max_deliver
        )
        if isinstance(outcome, pipeline.Emit):
            try:
                crash_point("after-handle", self.name, event.order_id, kind)
                await self._publish(outcome.events, history)
                crash_point("after-publish", self.name, event.order_id, kind)
            except Exception as exc:  # not stored: the same as a failed attempt
                outcome = pipeline.failure(event, exc, attempt, consumer.max_deliver)
        if isinstance(outcome, pipeline.DeadLetter):
            await self._give_up(msg, outcome)
            return
        if isinstance(outcome, pipeline.Again):
            error = outcome.error
            self._failed(error)
            delay = self.spec.retry.delay(attempt)
            log.warning(
                "%s: %s for order %s failed (attempt %d), retrying in %.2fs: %s: %s",
                self.name, kind, event.order_id, attempt, delay, type(error).__name__, error,
                extra=context,
            )  # fmt: skip
            await msg.nak(delay=delay)
            self.counters.retried += 1
            self.tracer.retrying(attempt, delay, error)
            await self._note_retry(msg, event, delay, error)
            return
        await msg.ack()
        self.counters.handled(time.perf_counter_ns() - started)
        if log.isEnabledFor(logging.DEBUG):
            outputs = ", ".join(subject_of(type(e)) for e in outcome.events) or "nothing"
            log.debug("%s: %s for order %s -> %s", self.name, kind, event.order_id,
                      outputs, extra=context)  # fmt: skip

    async def _give_up(self, msg: Msg, letter: pipeline.DeadLetter) -> None:
        """Dead-letter the input with the reason; answer its publisher when there is one."""
        if letter.error is not None:
            self._failed(letter.error)
        if letter.rejection is not None:
            # One rejection per rejected message, however often it is delivered.
            meta = msg.metadata
            rejection_id = f"orders.rejected:{meta.stream}:{meta.sequence.stream}"
            await self.emitter.emit(letter.rejection, Cause.of(msg), message_id=rejection_id)
        await self.dead_letters.add(msg, letter.reason)
        self.counters.dead_lettered += 1
        self.tracer.dead_lettered(letter.reason, letter.error)

    def _failed(self, exc: Exception) -> None:
        self.counters.failure(f"{type(exc).__name__}: {exc}")

    async def _publish(self, events: Sequence[Event], history: MessageHistory) -> None:
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
