"""The context every published event carries in its headers, so the log explains itself.

* ``Orderflow-Event-Id``: the event's own id, ``<kind>:<order id>`` (each
  order emits each kind of event at most once; a command or an alarm adds its
  attempt);
* ``Orderflow-Correlation-Id``: the order id, shared by every event of the order;
* ``Orderflow-Causation-Id``: the id of the event that caused this one;
* ``Orderflow-Function``: the function that emitted it;
* ``traceparent``: W3C trace context, continued from the input;
* ``Orderflow-Schema-Version``: the version of its kind's schema the payload
  was written with (``functions/events.py``); a message without it is version
  1, so ``nats pub`` needs none, and older versions are upgraded on read
  (``functions/upcasters.py``, ``orderflow/runtime/decoding.py``).

An input with no context (``nats pub``) gets an id from its place in the log,
``<stream>:<sequence>`` (even if its publisher gave it a ``Nats-Msg-Id``: the
position is what lets ``trace`` fetch it without a scan), a trace id
derived from its order id, and a span id derived from that position
(:func:`parent_of`: what ``orderflow.runtime.tracing`` makes its spans' parent). Every id
is derived, never drawn at random: replaying the same inputs yields the same
headers, and handlers never see any of this.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

EVENT_ID = "Orderflow-Event-Id"
CORRELATION_ID = "Orderflow-Correlation-Id"
CAUSATION_ID = "Orderflow-Causation-Id"
FUNCTION = "Orderflow-Function"
TRACEPARENT = "traceparent"
SCHEMA_VERSION = "Orderflow-Schema-Version"

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _hex(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def input_event_id(headers: Mapping[str, str], stream: str, sequence: int) -> str:
    """The id of a consumed message: its own, or its position in the log."""
    return headers.get(EVENT_ID) or f"{stream}:{sequence}"


def traceparent_of(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """``(trace id, span id)`` of the ``traceparent`` a message carries, if a valid one."""
    match = _TRACEPARENT.match(headers.get(TRACEPARENT, ""))
    return (match[1], match[2]) if match else None


def trace_id(headers: Mapping[str, str], order_id: str) -> str:
    carried = traceparent_of(headers)
    return carried[0] if carried else _hex(f"trace:{order_id}", 32)


def span_id(event_id: str) -> str:
    """The span of an event, derived from its id: what its ``traceparent`` names."""
    return _hex(event_id, 16)


def parent_of(headers: Mapping[str, str], order_id: str, input_id: str) -> tuple[str, str]:
    """``(trace id, span id)`` of a consumed message: its ``traceparent``'s, or for a message
    without one (``nats pub``) the trace of its order and a span named by its id."""
    return traceparent_of(headers) or (_hex(f"trace:{order_id}", 32), span_id(input_id))


def headers_for(
    *,
    event_id: str,
    order_id: str,
    function: str,
    cause: Mapping[str, str],
    cause_id: str,
    schema_version: int,
) -> dict[str, str]:
    """Headers of an event emitted by ``function`` in answer to a message with headers ``cause``."""
    return {
        EVENT_ID: event_id,
        CORRELATION_ID: order_id,
        CAUSATION_ID: cause_id,
        FUNCTION: function,
        # Same trace, a new span per event; sampled.
        TRACEPARENT: f"00-{trace_id(cause, order_id)}-{span_id(event_id)}-01",
        SCHEMA_VERSION: str(schema_version),
    }
