"""The loop of a function that answers requests: receive, decode, handle, reply.

Some questions need an answer at once, not an event later: "cancel this
order" is answered ``accepted`` or ``too late`` while the customer waits. A
function that ``serves`` a request subject (``streams.yaml``) listens on it
in a queue group, so each request reaches one of its processes, and answers
on the request's reply subject. The handler gets the decoded request and the
order's history (``orderflow.runtime.history``, the same reads and appends a
consumed message gets); what it changes it stores as events, with the request
as their cause, before it answers.

Nothing is kept about a request but its record: each answer is recorded
(:class:`~orderflow.runtime.intervened.Intervention`, on
``interventions.order.<ID>``) before it is sent, whoever asked, so ``trace``
shows it on the order's timeline. A requester that got no answer (the process
died after deciding, or the reply was lost) asks again with the same request
id, and the handler reads its earlier decision back from the history. A
request that cannot be decoded is answered with the reason; one whose handler
fails is answered with the error, so the requester knows to ask again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.events import REQUEST_TYPES, CancelAnswer, CancelRequest
from functions.history import History
from orderflow import subjects
from orderflow.config import Topology
from orderflow.runtime.context import EVENT_ID
from orderflow.runtime.emit import Cause, Emitter
from orderflow.runtime.failpoints import crash_point
from orderflow.runtime.history import MessageHistory, OrderLog
from orderflow.runtime.intervened import Intervention, rfc3339
from orderflow.runtime.metrics import Counters
from orderflow.runtime.tracing import OFF, Tracer

log = logging.getLogger("orderflow.runtime.requests")

RequestHandler = Callable[[CancelRequest, History], Awaitable[CancelAnswer]]


class Problem(msgspec.Struct, frozen=True):
    """The answer to a request that could not be handled."""

    error: str


_encode = msgspec.json.Encoder().encode


class Responder:
    def __init__(
        self,
        nc: Client,
        topology: Topology,
        function: str,
        handler: RequestHandler,
        counters: Counters,
        leader_reads: bool = False,
        tracer: Tracer = OFF,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = function
        self.spec = topology.functions[function]
        self.handler = handler
        self.counters = counters
        self.tracer = tracer
        self.emitter = Emitter(nc, function, self.spec.emits, tracer)
        self.reads = frozenset(self.spec.reads)
        self.log = OrderLog(nc, topology.events_stream, leader_only=leader_reads)
        self.records = topology.interventions
        self._decoders = {s: msgspec.json.Decoder(REQUEST_TYPES[s]) for s in self.spec.serves}
        self._in_hand: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Answer until ``stop`` is set; then stop listening and finish what is in hand."""
        subscriptions = [
            await self.nc.subscribe(s, queue=subjects.service(self.name), cb=self._received)
            for s in self.spec.serves
        ]
        await stop.wait()
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._in_hand:
            await asyncio.wait(self._in_hand)

    async def _received(self, msg: Msg) -> None:
        # Each request its own task: one slow history read holds one request.
        task = asyncio.create_task(self._answer(msg))
        self._in_hand.add(task)
        task.add_done_callback(self._in_hand.discard)

    async def _answer(self, msg: Msg) -> None:
        started = time.perf_counter_ns()
        reply: msgspec.Struct
        try:
            request = self._decoders[msg.subject].decode(msg.data)
        except msgspec.DecodeError as exc:
            # Answered with the reason, so nothing is lost and nothing is kept: the
            # requester has it at once (no dead letter to redrive).
            what = "" if isinstance(exc, msgspec.ValidationError) else "not JSON: "
            reply = Problem(f"invalid request: {what}{exc}")
            self.counters.failure(reply.error)
        else:
            reply = await self._handle(msg, request)
        if msg.reply:
            with contextlib.suppress(Exception):  # the requester left: it asks again
                await msg.respond(_encode(reply))
        if isinstance(reply, CancelAnswer):
            # As the worker counts a message: processed, its time and its histogram.
            self.counters.handled(time.perf_counter_ns() - started)

    async def _handle(self, msg: Msg, request: CancelRequest) -> msgspec.Struct:
        headers = msg.headers or {}
        cause = Cause(
            headers,
            headers.get(EVENT_ID) or f"{msg.subject}:{request.request_id or request.order_id}",
        )
        history = MessageHistory(self.log, self.emitter, cause, self.reads)
        try:
            with self.tracer.answering(msg.subject, request.order_id, cause.id):
                answer = await self.handler(request, history)
            crash_point("after-decide", self.name, request.order_id, msg.subject)
        except Exception as exc:
            self.counters.failure(f"{type(exc).__name__}: {exc}")
            log.warning("%s: %s for order %s failed: %r", self.name, msg.subject,
                        request.order_id, exc)  # fmt: skip
            return Problem(f"could not answer now, ask again: {type(exc).__name__}: {exc}")
        await self._record(request, answer)
        log.info("%s: %s for order %s: %s (%s)", self.name, msg.subject, request.order_id,
                 answer.answer, answer.rule)  # fmt: skip
        return answer

    async def _record(self, request: CancelRequest, answer: CancelAnswer) -> None:
        """The request and its answer, in the interventions stream, before the answer goes
        out; best effort: the decision is in the order's history already, so a record that
        cannot be written is logged and the answer still sent."""
        if self.records is None:
            return
        record = Intervention(
            "cancel", "", request.requested_by, rfc3339(datetime.now(UTC)), request.reason,
            order_id=request.order_id, request_id=answer.request_id, answer=answer.answer,
            rule=answer.rule,
        )  # fmt: skip
        subject = subjects.intervention_on_order(self.records.subject_prefix, request.order_id)
        try:
            # The same request asked again within the stream's duplicate window: one record.
            await self.js.publish(
                subject,
                _encode(record),
                stream=self.records.stream,
                headers={"Nats-Msg-Id": f"{answer.request_id}:{answer.answer}"},
            )
        except Exception as exc:
            log.warning("%s: could not record the answer for %s: %r", self.name,
                        request.order_id, exc)  # fmt: skip
