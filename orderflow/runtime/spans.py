"""The spans of one function process, made with the OpenTelemetry SDK and exported over OTLP.

Imported only when ``orderflow.runtime.tracing`` turns tracing on. Every
message handled is a *process* span (CONSUMER), every event stored a *send*
span (PRODUCER), after the OpenTelemetry messaging conventions
(``messaging.system=nats``, the subject and its template with the order id as
a parameter, the durable consumer, the message id, the order id as the
conversation id, ``error.type``). Retries, dead letters and compensations are
events on the process span.

The ids are the ones ``orderflow.runtime.context`` already writes into every
event's ``traceparent``, so the tree of spans is the tree of causes:

* a send span's id is its event's span id (derived from the event id), its
  parent the process span of the message that caused it;
* a process span's parent is its input's send span: the ``traceparent`` the
  input carries;
* an input without one (``nats pub orders.created``) has the trace of its
  order and a span id derived from its place in the log; the function that
  answers that ingress (``reject_invalid`` in ``streams.yaml``: payment, or the
  orchestrator) exports that span, once, as the root of the order's trace
  (*send orders.created*, at the time the stream stored it). So one order is one
  trace, one tree, across every process, in both modes.

A repeated emission (the stream refused it as stored already) gets a span id
of its own, so no two spans share one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from functions.events import PaymentRefunded, RefundPayment, ReleaseStock, StockReleased, subject_of
from orderflow import subjects
from orderflow.config import ConsumerSpec, FunctionSpec
from orderflow.runtime import context, election
from orderflow.runtime.decoding import claimed_order_id
from orderflow.runtime.election import Ack
from orderflow.runtime.metrics import VERSION
from orderflow.runtime.pipeline import reason_class
from orderflow.runtime.tracing import Store, Tracer

log = logging.getLogger("orderflow.runtime.spans")

#: What undoes an effect: an event on the process span that sends one.
COMPENSATIONS = frozenset(
    subject_of(cls) for cls in (PaymentRefunded, StockReleased, RefundPayment, ReleaseStock)
)

#: Seconds given to sending the last spans when the process stops.
FLUSH_ON_EXIT_S = 5.0

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class _Ids(RandomIdGenerator):
    """Random ids, but for the span (and the trace, for a root) about to start, when chosen:
    the SDK asks while starting a span, synchronously, right after it is set."""

    def __init__(self) -> None:
        self.span: int | None = None
        self.trace: int | None = None

    def generate_span_id(self) -> int:
        chosen, self.span = self.span, None
        return chosen or super().generate_span_id()

    def generate_trace_id(self) -> int:
        chosen, self.trace = self.trace, None
        return chosen or super().generate_trace_id()

    def clear(self) -> None:
        """Forget what was chosen: a span the SDK did not start must not pass it on."""
        self.span = self.trace = None


def resource_attributes(function: str, env: Mapping[str, str]) -> dict[str, AttributeValue]:
    """Each function its own service, as in ``nats micro`` (``orderflow-payment``), unless
    ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` names one."""
    attributes: dict[str, AttributeValue] = {
        "orderflow.function": function,
        "service.version": VERSION,
        "process.pid": os.getpid(),
    }
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        attributes["service.name"] = subjects.service(function)
    return attributes


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: only http/protobuf is installed (the "
                    "collector's port 4318); exporting with it", protocol)  # fmt: skip
    return OTLPSpanExporter()  # the endpoint, headers, timeout and compression from OTEL_*


def _failed(span: trace.Span, error_type: str, description: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description[:200]))


class Spans(Tracer):
    """Tracing on: the hooks make spans and hand them to the SDK's batch processor."""

    enabled = True

    def __init__(
        self, function: str, spec: FunctionSpec, exporters: Sequence[str], env: Mapping[str, str]
    ) -> None:
        self.function = function
        self.ids = _Ids()
        # The SDK reads the rest of OTEL_* itself: OTEL_SERVICE_NAME and
        # OTEL_RESOURCE_ATTRIBUTES here, OTEL_TRACES_SAMPLER in the provider,
        # OTEL_BSP_* in the processor, the endpoint and its headers in the exporter.
        self.provider = TracerProvider(
            resource=Resource.create(resource_attributes(function, env)),
            id_generator=self.ids,
            shutdown_on_exit=False,  # shutdown() below, when the service stops
        )
        for name in exporters:
            self.provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
        self.tracer = self.provider.get_tracer("orderflow", VERSION)
        # The process's own provider too: spans that instrumented libraries make in a
        # handler (an HTTP client to a real gateway) hang under its process span.
        trace.set_tracer_provider(self.provider)
        #: Ingress kinds this function answers: it makes their root span.
        self.answers = frozenset(spec.reject_invalid)

    # --- process spans --------------------------------------------------------

    def processing(self, msg: Msg, consumer: ConsumerSpec) -> AbstractContextManager[None]:
        return self._processing(msg, consumer)

    @contextmanager
    def _processing(self, msg: Msg, consumer: ConsumerSpec) -> Iterator[None]:
        span = self._process_span(msg, consumer)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        except Exception as exc:  # could not settle it (publish, ack, dead letter)
            _failed(span, type(exc).__qualname__, str(exc))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def _process_span(self, msg: Msg, consumer: ConsumerSpec) -> trace.Span:
        headers = msg.headers or {}
        meta = msg.metadata
        input_id = context.input_event_id(headers, meta.stream, meta.sequence.stream)
        order_id, kind = subjects.parse(msg.subject)
        # Payload-only ingress: the payload names the order (the trace is its order's).
        order_id = order_id or claimed_order_id(msg.data)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": msg.subject,
            "messaging.destination.template": subjects.template(msg.subject),
            "messaging.consumer.group.name": consumer.durable,
            "messaging.destination.subscription.name": consumer.durable,
            "messaging.message.id": input_id,
            "messaging.message.body.size": len(msg.data),
            "orderflow.function": self.function,
            "orderflow.stream": meta.stream,
            "orderflow.stream_sequence": meta.sequence.stream,
            "orderflow.attempt": meta.num_delivered,
        }
        if order_id is not None:
            attributes["messaging.message.conversation_id"] = order_id
        if cause := headers.get(context.CAUSATION_ID):
            attributes["orderflow.causation_id"] = cause
        parent = self._parent_of(msg, kind, order_id, input_id)
        return self.tracer.start_span(
            f"process {subjects.template(msg.subject)}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )

    def _parent_of(
        self, msg: Msg, kind: str, order_id: str | None, input_id: str
    ) -> otel_context.Context:
        headers = msg.headers or {}
        carried = context.traceparent_of(headers)
        if carried is None and order_id is None:
            return otel_context.Context()  # unreadable, no context: a trace of its own
        trace_hex, span_hex = context.parent_of(headers, order_id or "", input_id)
        if carried is None and kind in self.answers and msg.metadata.num_delivered == 1:
            self._ingress_span(msg, trace_hex, span_hex, order_id, input_id)
        remote = SpanContext(int(trace_hex, 16), int(span_hex, 16), True, _SAMPLED)
        return trace.set_span_in_context(NonRecordingSpan(remote))

    def _ingress_span(
        self, msg: Msg, trace_hex: str, span_hex: str, order_id: str | None, input_id: str
    ) -> None:
        """The root of an order that came without a trace: its publish, as the log stored it."""
        stored = int(msg.metadata.timestamp.timestamp() * 1e9)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": msg.subject,
            "messaging.destination.template": subjects.template(msg.subject),
            "messaging.message.id": input_id,
            "messaging.message.body.size": len(msg.data),
            "orderflow.ingress": True,
            "orderflow.recorded_by": self.function,
        }
        if order_id is not None:
            attributes["messaging.message.conversation_id"] = order_id
        self.ids.trace, self.ids.span = int(trace_hex, 16), int(span_hex, 16)
        root = self.tracer.start_span(
            f"send {subjects.template(msg.subject)}",
            context=otel_context.Context(),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            start_time=stored,
        )
        self.ids.clear()
        root.end(end_time=stored)

    # --- request spans ----------------------------------------------------------

    def answering(self, subject: str, order_id: str, cause_id: str) -> AbstractContextManager[None]:
        return self._answering(subject, order_id, cause_id)

    @contextmanager
    def _answering(self, subject: str, order_id: str, cause_id: str) -> Iterator[None]:
        # A request carries no trace: it is a root of its own in the order's trace, at the
        # id its events name as their cause's, so what it stores hangs under it.
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": subject,
            "messaging.destination.template": subject,
            "messaging.message.id": cause_id,
            "messaging.message.conversation_id": order_id,
            "orderflow.function": self.function,
        }
        self.ids.trace = int(context.trace_id({}, order_id), 16)
        self.ids.span = int(context.span_id(cause_id), 16)
        span = self.tracer.start_span(
            f"process {subject}",
            context=otel_context.Context(),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        self.ids.clear()
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        except Exception as exc:
            _failed(span, type(exc).__qualname__, str(exc))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def retrying(self, attempt: int, delay: float, error: Exception) -> None:
        span = trace.get_current_span()
        span.add_event("retry", {
            "orderflow.attempt": attempt,
            "orderflow.retry_in_s": delay,
            "exception.type": type(error).__qualname__,
            "exception.message": str(error)[:500],
        })  # fmt: skip
        _failed(span, type(error).__qualname__, str(error))

    def dead_lettered(self, reason: str, error: Exception | None) -> None:
        span = trace.get_current_span()
        what = reason_class(reason)
        span.add_event("dead_letter", {"orderflow.reason": reason[:1000],
                                       "orderflow.reason_class": what})  # fmt: skip
        _failed(span, type(error).__qualname__ if error is not None else what, reason)

    # --- send spans -------------------------------------------------------------

    def storing(self, store: Store) -> Store:
        async def traced(nc: Client, subject: str, payload: bytes, headers: dict[str, str]) -> Ack:
            started = time.time_ns()
            try:
                ack = await store(nc, subject, payload, headers)
            except Exception as exc:
                self._sent(subject, payload, headers, started, None, exc)
                raise
            self._sent(subject, payload, headers, started, ack, None)
            return ack

        return traced

    def _sent(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        started: int,
        ack: Ack | None,
        error: Exception | None,
    ) -> None:
        kind = subjects.kind_of(subject)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": subject,
            "messaging.destination.template": subjects.template(subject),
            "messaging.message.body.size": len(payload),
            "orderflow.function": self.function,
        }
        if message_id := headers.get(context.EVENT_ID) or headers.get("Nats-Msg-Id"):
            attributes["messaging.message.id"] = message_id
        if order_id := headers.get(context.CORRELATION_ID):
            attributes["messaging.message.conversation_id"] = order_id
        if cause := headers.get(context.CAUSATION_ID):
            attributes["orderflow.causation_id"] = cause
        repeat = ack is not None and (
            ack.duplicate
            or (ack.error is not None and ack.error.err_code == election.WRONG_LAST_SEQUENCE)
        )
        if ack is not None and ack.error is None and not ack.duplicate:
            attributes["orderflow.stream_sequence"] = ack.seq
        parent: otel_context.Context | None = None  # the process span in hand
        carried = context.traceparent_of(headers)
        if carried is not None and not repeat:
            # The span the event's traceparent names, in the trace it names.
            trace_id, span_id = int(carried[0], 16), int(carried[1], 16)
            current = trace.get_current_span().get_span_context()
            if not current.is_valid or current.trace_id != trace_id:
                parent, self.ids.trace = otel_context.Context(), trace_id
            self.ids.span = span_id
        span = self.tracer.start_span(
            f"send {subjects.template(subject)}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            start_time=started,
        )
        self.ids.clear()
        if repeat:
            span.set_attribute("orderflow.repeat", True)
            span.add_event("stored already: the stream refused the repeat")
        if error is not None:
            _failed(span, type(error).__qualname__, str(error))
        elif ack is not None and ack.error is not None and not repeat:
            _failed(span, f"jetstream:{ack.error.err_code}", ack.error.description)
        elif kind in COMPENSATIONS:
            trace.get_current_span().add_event("compensation", {"orderflow.kind": kind})
        span.end()

    def shutdown(self) -> None:
        def flush() -> None:
            self.provider.force_flush()
            self.provider.shutdown()

        # In a thread, waited for a bounded time: the exporter retries a
        # collector that is away for its whole timeout, and the process must
        # exit within its grace period (the supervisor kills it after 10 s).
        sending = threading.Thread(target=flush, name="orderflow-spans-flush", daemon=True)
        sending.start()
        sending.join(FLUSH_ON_EXIT_S)
        if sending.is_alive():
            log.warning("%s: spans still unsent after %.0f s at exit; dropped",
                        self.function, FLUSH_ON_EXIT_S)  # fmt: skip
