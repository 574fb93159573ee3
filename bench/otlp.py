"""An OTLP/HTTP trace receiver on loopback: what a collector would be sent, decoded.

The function processes export their spans to it as they would to an
OpenTelemetry Collector (``OTEL_EXPORTER_OTLP_ENDPOINT=<its url>``): each
``POST /v1/traces`` is an ``ExportTraceServiceRequest`` in protobuf, decoded
here with ``opentelemetry-proto`` (which the OTLP exporter installs), so what
arrives is checked as the exporter really wrote it. The tests keep every span
and check the tree of an order (``tests/e2e/test_telemetry.py``); the
benchmark's traced row only counts them (``keep=False``).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the exporter sent it; ids in hex, as ``traceparent`` writes them."""

    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: str  # CONSUMER, PRODUCER, ...
    service: str  # the resource's service.name
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    error: bool  # status ERROR
    resource: dict[str, Any] = field(default_factory=dict)

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for kv in pairs:
        assert isinstance(kv, KeyValue)
        found[kv.key] = _value(kv.value)
    return found


def decode(body: bytes) -> list[ReceivedSpan]:
    """Every span of one export request."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    name=s.name,
                    kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    service=str(resource.get("service.name", "")),
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    attributes=_attributes(s.attributes),
                    events=[(e.name, _attributes(e.attributes)) for e in s.events],
                    error=s.status.code == Status.STATUS_CODE_ERROR,
                    resource=resource,
                ))  # fmt: skip
    return spans


class OtlpReceiver:
    """``POST /v1/traces`` on 127.0.0.1 (a free port), in a thread; ``with`` starts and stops it."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.received = 0  # spans, kept or not
        self.requests = 0
        self.refused = 0  # requests that were not a decodable export
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` should say (the exporter appends /v1/traces)."""
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    if self.path != TRACES_PATH:
                        raise ValueError(f"not {TRACES_PATH}: {self.path}")
                    spans = decode(body)
                except Exception:
                    with receiver._lock:
                        receiver.refused += 1
                    self.send_error(400)
                    return
                receiver._got(spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: one line per export would drown the output

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _got(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.requests += 1
            self.received += len(spans)
            if self.keep:
                self.spans.extend(spans)

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
