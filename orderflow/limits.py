"""Bounded input: the ``limits`` of ``streams.yaml``, checked on every decoded message.

``functions/events.py`` fixes the hard ceilings as part of the contract (at
most 100 items, quantities up to 1,000, identifiers up to 64 characters);
msgspec enforces them while decoding. ``limits`` may only tighten them, for a
deployment that wants smaller orders: a value above its ceiling fails at start,
naming the key. The payload's size in bytes is ``dead_letters.max_payload``,
checked before decoding; ``max_message_bytes`` is the largest message the
server and the streams accept at all (``runner.py auth`` writes it into the
server's configuration, provisioning into each stream's ``max_msg_size``).

The limits apply to ``orders.created``, the one subject anyone may publish; the
other events are emitted by the functions (under ``up --secure``, only by
them) from orders that passed these limits. A message over a limit is invalid
input like any other: dead-lettered at once with the reason, which names the
path, the value and the limit, and answered with ``orders.rejected``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

from functions.events import Event, OrderCreated, OrderItem

#: Headroom above ``max_message_bytes`` in the server's ``max_payload``: a dead
#: letter is its original plus our headers (the reason is at most 1000 bytes),
#: so whatever a stream accepted can always be dead-lettered.
DEAD_LETTER_HEADROOM = 8 * 1024


def _fields(cls: type[msgspec.Struct]) -> dict[str, mi.Type]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return {f.name: f.type for f in info.fields}


def _ceilings() -> dict[str, int]:
    """The contract's bounds on ``orders.created``, read from the Structs themselves."""
    order, item = _fields(OrderCreated), _fields(OrderItem)
    items, quantity = order["items"], item["quantity"]
    assert isinstance(items, mi.ListType) and items.max_length is not None
    assert isinstance(quantity, mi.IntType) and quantity.le is not None
    strings = [t.max_length for t in (*order.values(), *item.values()) if isinstance(t, mi.StrType)]
    assert all(n is not None for n in strings)
    return {
        "max_items": items.max_length,
        "max_quantity": quantity.le,
        "max_string_length": max(n for n in strings if n is not None),
    }


#: limit name -> the contract's ceiling (functions/events.py)
CEILINGS = _ceilings()


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: items in one order
    max_items: Annotated[int, Meta(ge=1)] = CEILINGS["max_items"]
    #: units of one item
    max_quantity: Annotated[int, Meta(ge=1)] = CEILINGS["max_quantity"]
    #: characters in any string of an order (ids, SKUs, payment token)
    max_string_length: Annotated[int, Meta(ge=1)] = CEILINGS["max_string_length"]
    #: the largest message (headers and payload) a stream stores; larger is refused
    max_message_bytes: Annotated[int, Meta(ge=1024)] = 128 * 1024

    def server_max_payload(self) -> int:
        """The nats-server ``max_payload``: a stored message plus dead-letter headers."""
        return self.max_message_bytes + DEAD_LETTER_HEADROOM


def config_problems(limits: Limits, max_payload: int) -> list[str]:
    """What is wrong with ``limits`` (``dead_letters.max_payload`` for the byte bound)."""
    problems = [
        f"limits.{name}: {getattr(limits, name)} exceeds the contract's bound {ceiling} "
        "(functions/events.py); limits may only tighten it"
        for name, ceiling in CEILINGS.items()
        if getattr(limits, name) > ceiling
    ]
    if max_payload > limits.max_message_bytes:
        problems.append(
            f"limits.max_message_bytes: {limits.max_message_bytes} is below "
            f"dead_letters.max_payload ({max_payload}); streams would refuse what the "
            "functions accept"
        )
    return problems


def _length(path: str, value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"{path}: {len(value)} characters, limit {limit} (limits.max_string_length)"
    return None


def check(event: Event, limits: Limits) -> str | None:
    """Why ``event`` is over ``limits`` (the first reason, with its path), or None."""
    if not isinstance(event, OrderCreated):
        return None
    if len(event.items) > limits.max_items:
        return f"$.items: {len(event.items)} items, limit {limits.max_items} (limits.max_items)"
    for name in ("order_id", "customer_id", "payment_token"):
        if problem := _length(f"$.{name}", getattr(event, name), limits.max_string_length):
            return problem
    for i, item in enumerate(event.items):
        if problem := _length(f"$.items[{i}].sku", item.sku, limits.max_string_length):
            return problem
        if item.quantity > limits.max_quantity:
            return (
                f"$.items[{i}].quantity: {item.quantity}, limit {limits.max_quantity} "
                "(limits.max_quantity)"
            )
    return None
