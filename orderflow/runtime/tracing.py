"""Whether a function process exports spans, and the hooks the worker calls either way.

Tracing is on only when both hold:

* the extra ``otel`` is installed (``pip install 'orderflow[otel]'``: the
  OpenTelemetry SDK and its OTLP/HTTP exporter), and
* the environment asks for traces the standard way: ``OTEL_EXPORTER_OTLP_ENDPOINT``
  or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or ``OTEL_TRACES_EXPORTER``
  names ``otlp`` or ``console``;

and neither ``OTEL_TRACES_EXPORTER=none`` nor ``OTEL_SDK_DISABLED=true`` says
otherwise. Asked for without the extra, the process says so once and runs
without. Off, nothing of OpenTelemetry is imported and the worker calls the
hooks of :data:`OFF`, which do nothing (what that costs: bench/README.md). On,
the hooks are ``orderflow.runtime.spans``'s, configured by the rest of the
standard ``OTEL_*`` variables (service name, resource, sampler, batching,
headers); docs/telemetry.md says which.

The hooks, and where they are called:

* :meth:`Tracer.processing`: around each consumed message, in the worker;
* :meth:`Tracer.retrying`, :meth:`Tracer.dead_lettered`: what became of it;
* :meth:`Tracer.storing`: wraps the emitter's publish (``election.store``), once,
  when the emitter is made: off, it hands back the same function, so a publish
  costs nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager

from nats.aio.client import Client
from nats.aio.msg import Msg

from orderflow.config import ConsumerSpec, FunctionSpec
from orderflow.runtime.election import Ack

log = logging.getLogger("orderflow.runtime.tracing")

#: How the emitter stores an event: ``election.store``'s signature, as the emitter calls it.
Store = Callable[[Client, str, bytes, dict[str, str]], Awaitable[Ack]]

#: Where an OTLP exporter sends spans; either one set turns tracing on.
ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
#: The span exporters this runtime can make (``OTEL_TRACES_EXPORTER``, comma-separated).
EXPORTERS = frozenset({"otlp", "console"})

_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()


class Tracer:
    """Tracing off: every hook does nothing, and costs a call."""

    enabled = False

    def processing(self, msg: Msg, consumer: ConsumerSpec) -> AbstractContextManager[None]:
        """Around everything done with one consumed message (its process span)."""
        return _NOTHING

    def answering(self, subject: str, order_id: str, cause_id: str) -> AbstractContextManager[None]:
        """Around the answer to one request (``orders.cancel``) about ``order_id``, whose
        events name ``cause_id`` as their cause."""
        return _NOTHING

    def retrying(self, attempt: int, delay: float, error: Exception) -> None:
        """The message in hand failed this attempt and is handed back for ``delay`` seconds."""

    def dead_lettered(self, reason: str, error: Exception | None) -> None:
        """The message in hand is given up, for ``reason``."""

    def storing(self, store: Store) -> Store:
        """``store``, or a function that stores the same way and says so in a span."""
        return store

    def shutdown(self) -> None:
        """Send what is still buffered; the process is about to exit."""


OFF = Tracer()


def exporters_wanted(env: Mapping[str, str]) -> list[str]:
    """The span exporters the standard ``OTEL_*`` variables ask for; none means tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if "none" in named:
        return []
    if not named:
        # Only an endpoint set: the SDK's own default exporter, OTLP.
        return ["otlp"] if any(env.get(var) for var in ENDPOINTS) else []
    unknown = sorted(set(named) - EXPORTERS)
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER names %s: only %s are supported here; ignored",
                    ", ".join(unknown), " and ".join(sorted(EXPORTERS)))  # fmt: skip
    return [n for n in named if n in EXPORTERS]


def tracer_for(function: str, spec: FunctionSpec, env: Mapping[str, str] | None = None) -> Tracer:
    """The tracer of one function process: :data:`OFF` unless the extra and the environment
    both say otherwise."""
    env = os.environ if env is None else env
    exporters = exporters_wanted(env)
    if not exporters:
        return OFF
    try:
        # Here, not at the top: OpenTelemetry is imported only by a process that traces.
        from orderflow.runtime import spans
    except ImportError as exc:
        log.warning("%s: the environment asks for traces, but the extra 'otel' is not "
                    "installed (pip install 'orderflow[otel]'): no spans (%s)",
                    function, exc)  # fmt: skip
        return OFF
    return spans.Spans(function, spec, exporters, env)
