"""Where every event lives: the order id is a token of the subject, so the log is addressable.

An event of kind ``payments.succeeded`` (its type, ``functions.events``) for
order ``o-1`` is stored on ``order.o-1.payments.succeeded``. So the server's
subject index answers "everything about order o-1" (``order.o-1.>``) and "the
last ``stock.reserved`` of order o-1" without reading anything else, however
long the history. Each order emits each kind at most once: a publish says
``Nats-Expected-Last-Subject-Sequence: 0`` on its own subject, so the stream
itself refuses a second one, for as long as it keeps the first (not just for a
duplicate window). The delivery decision is checked the same way against both
of its subjects (:func:`decision`): an order is delivered or cancelled, once.

The one exception is ingress: a plain ``nats pub orders.created '{...}'``
(no headers, the order id only in the payload) still starts an order, and so
does ``order.<ID>.orders.created``, whose subject id must match the payload's.
The orchestrator's alarms live in their own stream, under ``timer.<ID>.``, for
the same reason.

Every name the runtime builds from an order id is built here, nowhere else;
so are the server's own names it uses (JetStream's API, KV's subjects,
service names), below.
"""

from __future__ import annotations

import re

#: The payload-only ingress subject (``nats pub orders.created``).
INGRESS = "orders.created"
#: ``order.<ID>.<kind>``: an order's history.
ORDER = "order"
#: ``timer.<ID>.alarm``: an order's pending alarm (a scheduled message);
#: ``timer.<ID>.saga.timeout``: the alarms that fired.
TIMER = "timer"
ALARM = "alarm"
#: Kinds stored under ``timer.`` rather than ``order.``.
TIMER_KINDS = frozenset({"saga.timeout"})
#: The token standing for an order id that could not be read (ids never start with ``_``).
NO_ORDER = "_"


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def safe(order_id: str) -> bool:
    """Whether ``order_id`` can be a subject token (the contract's OrderId pattern)."""
    return len(order_id) <= 64 and _SAFE.match(order_id) is not None


def subject(kind: str, order_id: str) -> str:
    """The subject an event of ``kind`` for ``order_id`` is stored on (``order._`` for an
    id that cannot be a token: only a rejection of it is ever stored)."""
    token = order_id if order_id == "*" or safe(order_id) else NO_ORDER
    return f"{TIMER if kind in TIMER_KINDS else ORDER}.{token}.{kind}"


def alarm(order_id: str) -> str:
    """Where an order's one pending alarm waits: a newer alarm replaces the older."""
    return f"{TIMER}.{order_id}.{ALARM}"


#: Kinds published on the order's alarm subject rather than their own: the
#: alarm itself (a scheduled message) and its withdrawal.
ALARM_KINDS = frozenset({"saga.timeout", "saga.alarms.cleared"})


def published_on(kind: str, order_id: str) -> str:
    """The subject an event of ``kind`` is published on: its own, but for alarms
    (``order_id`` ``*``: the pattern for every order)."""
    return alarm(order_id) if kind in ALARM_KINDS else subject(kind, order_id)


def filters(kind: str) -> list[str]:
    """The subject filters a consumer of ``kind`` uses: every order's, and ingress."""
    wildcard = subject(kind, "*")
    return [INGRESS, wildcard] if kind == INGRESS else [wildcard]


def decision(order_id: str) -> str:
    """Every subject of the order's delivery decision (``functions.events.DELIVERY_DECISIONS``):
    ``delivery.scheduled`` or ``delivery.cancelled``, whichever was stored first.
    One filter, the same string for every writer, so a cluster serializes them."""
    return f"{ORDER}.{order_id}.delivery.*"


def of_order(order_id: str, prefix: str = ORDER) -> str:
    """Everything stored about ``order_id`` under ``prefix``: one filter, no scan."""
    return f"{prefix}.{order_id}.>"


def parse(subject: str) -> tuple[str | None, str]:
    """``(order id, kind)`` of a stored subject; the id is ``None`` for payload-only ingress.

    A subject outside the layout comes back as its own kind, with no id, and
    decodes to nothing (``orderflow.runtime.decoding``).
    """
    if subject == INGRESS:
        return None, INGRESS
    head, _, rest = subject.partition(".")
    if head in (ORDER, TIMER):
        order_id, _, kind = rest.partition(".")
        if order_id and kind:
            return order_id, kind
    return None, subject


def kind_of(subject: str) -> str:
    return parse(subject)[1]


#: How a subject's template names the order id (OpenTelemetry's destination template).
ORDER_PARAMETER = "{order_id}"


def template(subject: str) -> str:
    """``subject`` with its order id as a parameter (``order.{order_id}.payments.succeeded``):
    a name of few values, for span names; a subject without an id is its own."""
    order_id, kind = parse(subject)
    if order_id is None:
        return subject
    return f"{subject.partition('.')[0]}.{ORDER_PARAMETER}.{kind}"


def dead_letter(prefix: str, order_id: str | None, function: str) -> str:
    """``dlq.<ID>.<function>``: an order's dead letters, found by its id."""
    return f"{prefix}.{order_id or NO_ORDER}.{function}"


def retry_note(prefix: str, order_id: str, function: str) -> str:
    """``retries.<ID>.<function>``: an order's failed attempts, found by its id."""
    return f"{prefix}.{order_id}.{function}"


def intervention_on_function(prefix: str, function: str) -> str:
    """``interventions.function.<name>``: what operators did to a function (pause, resume)."""
    return f"{prefix}.function.{function}"


def intervention_on_order(prefix: str, order_id: str) -> str:
    """``interventions.order.<ID>``: what was asked of an order (cancel), and the answer."""
    return f"{prefix}.order.{order_id}"


# --- the server's names ---------------------------------------------------------


def consumer_next(stream: str, durable: str) -> str:
    """Where a pull consumer is asked for its next messages."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"


def consumer_pause(stream: str, durable: str) -> str:
    """Where a consumer is paused until a time, or resumed (nats-server 2.11+)."""
    return f"$JS.API.CONSUMER.PAUSE.{stream}.{durable}"


def consumer_info(stream: str, durable: str) -> str:
    return f"$JS.API.CONSUMER.INFO.{stream}.{durable}"


def acks(stream: str, durable: str) -> str:
    """The reply subjects of a consumer's messages (acks, naks, in-progress): a wildcard."""
    return f"$JS.ACK.{stream}.{durable}.>"


def direct_get(stream: str) -> str:
    """The direct get API of ``stream``; ``.<subject>`` appended asks for its last message,
    a body asks for a batch (``multi_last``)."""
    return f"$JS.API.DIRECT.GET.{stream}"


def leader_get(stream: str) -> str:
    """A stream's message get, answered by its leader only (the subject in the body)."""
    return f"$JS.API.STREAM.MSG.GET.{stream}"


def kv_stream(bucket: str) -> str:
    """The stream a KV bucket is."""
    return f"KV_{bucket}"


def kv_key(bucket: str, key: str) -> str:
    """The subject a KV key is stored on (``>`` for every key)."""
    return f"$KV.{bucket}.{key}"


def service(function: str) -> str:
    """The NATS micro service name of a function (``$SRV.PING.<name>``)."""
    return f"orderflow-{function}"


def service_endpoint(function: str) -> str:
    """The subject of a function's one service endpoint: its counters, as JSON."""
    return f"orderflow.{function}.messages"


def service_api(verb: str, function: str) -> str:
    """A micro service request to every instance of ``function`` (``PING``, ``STATS``, ``INFO``)."""
    return f"$SRV.{verb}.{service(function)}"
