"""The msgspec contract: decoding by subject, validation at the boundary, one table of subjects."""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from functions import events as events_mod
from functions.events import (
    EVENT_CLASSES,
    EVENT_TYPES,
    AlarmCleared,
    ChargePayment,
    DeliveryCancelled,
    DeliveryScheduled,
    Event,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    OrderItem,
    OrderRejected,
    PaymentFailed,
    PaymentRefunded,
    PaymentSucceeded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleDelivery,
    Shortage,
    StepTimedOut,
    StockLine,
    StockReleased,
    StockReserved,
    StockUnavailable,
    event_id,
    subject_of,
)


def order_payload() -> dict[str, Any]:
    """What ``nats pub orders.created '{...}'`` sends: no ``type`` field."""
    return {
        "order_id": "o-1001",
        "customer_id": "c-7",
        "items": [{"sku": "BOOK-42", "quantity": 2, "unit_price_cents": 1500}],
        "payment_token": "tok_visa",
    }


def decode(subject: str, payload: dict[str, Any]) -> Event:
    return msgspec.json.decode(json.dumps(payload).encode(), type=EVENT_TYPES[subject])


def test_decodes_by_subject_without_type_field() -> None:
    order = decode("orders.created", order_payload())
    assert order == OrderCreated(
        "o-1001", "c-7", [OrderItem("BOOK-42", 2, 1500)], payment_token="tok_visa"
    )
    assert isinstance(order, OrderCreated)
    assert order.total_cents == 3000


def test_total_sums_every_line() -> None:
    payload = order_payload()
    payload["items"].append({"sku": "PEN-1", "quantity": 3, "unit_price_cents": 250})
    order = decode("orders.created", payload)
    assert isinstance(order, OrderCreated)
    assert order.total_cents == 3000 + 750


def test_encoded_event_carries_its_subject_as_type() -> None:
    order = decode("orders.created", order_payload())
    assert json.loads(msgspec.json.encode(order))["type"] == "orders.created"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["items"][0].update(quantity=0), "$.items[0].quantity"),
        (lambda p: p["items"][0].update(quantity=-3), "$.items[0].quantity"),
        (lambda p: p["items"][0].update(quantity="2"), "$.items[0].quantity"),
        (lambda p: p["items"][0].update(unit_price_cents=-1), "$.items[0].unit_price_cents"),
        (lambda p: p.update(items=[]), "$.items"),
        (lambda p: p["items"][0].pop("unit_price_cents"), "$.items[0]"),
        (lambda p: p.update(order_id="o.1001"), "$.order_id"),
        (lambda p: p.update(order_id="-o-1001"), "$.order_id"),
        (lambda p: p.update(order_id=""), "$.order_id"),
        (lambda p: p.update(type="payments.failed"), "$.type"),
    ],
    ids=[
        "zero-quantity",
        "negative-quantity",
        "quantity-as-string",
        "negative-price",
        "empty-items",
        "missing-item-field",
        "dot-in-order-id",
        "order-id-leading-dash",
        "empty-order-id",
        "type-of-another-subject",
    ],
)
def test_invalid_order_names_the_path(
    mutate: Callable[[dict[str, Any]], object], expected: str
) -> None:
    payload = order_payload()
    mutate(payload)
    with pytest.raises(msgspec.ValidationError) as caught:
        decode("orders.created", payload)
    assert f"`{expected}`" in str(caught.value)


def test_missing_top_level_field_is_named() -> None:
    payload = order_payload()
    del payload["payment_token"]
    with pytest.raises(msgspec.ValidationError, match="missing required field `payment_token`"):
        decode("orders.created", payload)


def test_unknown_fields_are_read_past_and_never_written() -> None:
    # A storefront adds a coupon code, and a colour to an item: tolerant readers
    # decode the order; strict writers encode only what the contract has.
    payload = order_payload()
    payload["coupon_code"] = "FREE"
    payload["items"][0]["colour"] = "red"
    order = decode("orders.created", payload)
    assert isinstance(order, OrderCreated)
    assert order == decode("orders.created", order_payload())
    written = json.loads(msgspec.json.encode(ChargePayment("o-1001", 1, order=order)))
    assert set(written) == {"type", "order_id", "attempt", "order"}
    assert set(written["order"]) == {"type", *order_payload()}
    assert set(written["order"]["items"][0]) == {"sku", "quantity", "unit_price_cents"}


def test_an_unknown_field_does_not_excuse_a_missing_or_wrong_one() -> None:
    payload = order_payload()
    payload["payment_tokn"] = payload.pop("payment_token")  # a typo is a missing field
    with pytest.raises(msgspec.ValidationError, match="missing required field `payment_token`"):
        decode("orders.created", payload)
    payload = order_payload() | {"coupon_code": "FREE", "customer_id": 7}
    wrong = r"Expected `str`, got `int` - at `\$.customer_id`"
    with pytest.raises(msgspec.ValidationError, match=wrong):
        decode("orders.created", payload)


def test_event_types_maps_every_subject_to_its_class() -> None:
    expected: dict[str, type[Event]] = {
        "orders.created": OrderCreated,
        "orders.completed": OrderCompleted,
        "orders.cancelled": OrderCancelled,
        "orders.rejected": OrderRejected,
        "payments.succeeded": PaymentSucceeded,
        "payments.failed": PaymentFailed,
        "payments.refunded": PaymentRefunded,
        "stock.reserved": StockReserved,
        "stock.unavailable": StockUnavailable,
        "stock.released": StockReleased,
        "delivery.scheduled": DeliveryScheduled,
        "delivery.cancelled": DeliveryCancelled,
        "saga.payment.charge": ChargePayment,
        "saga.payment.refund": RefundPayment,
        "saga.stock.reserve": ReserveStock,
        "saga.stock.release": ReleaseStock,
        "saga.delivery.schedule": ScheduleDelivery,
        "saga.timeout": StepTimedOut,
        "saga.alarms.cleared": AlarmCleared,
    }
    assert dict(EVENT_TYPES) == expected
    assert set(EVENT_TYPES.values()) == set(EVENT_CLASSES)
    # Found from the definitions: every class of the module with a subject as its tag.
    defined = {
        c for c in vars(events_mod).values()
        if isinstance(c, type) and issubclass(c, Event) and "." in str(c.__struct_config__.tag)
    }  # fmt: skip
    assert set(EVENT_CLASSES) == defined and len(defined) == 19
    for subject, cls in EVENT_TYPES.items():
        assert subject_of(cls) == subject


PLACED = OrderCreated("o-1", "c-1", [OrderItem("SKU-1", 1, 100)], payment_token="tok_visa")

ONE_OF_EACH: list[Event] = [
    PLACED,
    OrderRejected("o-1", reason="invalid orders.created: Expected `int` >= 1"),
    OrderCompleted("o-1", tracking_id="TRK-1"),
    OrderCancelled("o-1", reason="payment failed: card_declined"),
    PaymentSucceeded("o-1", 100, charge_id="ch_1"),
    PaymentFailed("o-1", 100, reason="card_declined"),
    PaymentRefunded("o-1", 3000, charge_id="ch_1"),
    StockReserved("o-1", items=[StockLine("SKU-1", 1)]),
    StockUnavailable("o-1", shortages=[Shortage("SKU-1", 2, 1)]),
    StockReleased("o-1", items=[]),
    DeliveryScheduled("o-1", tracking_id="TRK-1", carrier="orderflow-post"),
    DeliveryCancelled("o-1", reason="changed my mind", request_id="r-1", requested_by="ann"),
    ChargePayment("o-1", 1, order=PLACED),
    RefundPayment("o-1", 2, reason="out of stock: SKU-1 (wanted 2, 1 left)"),
    ReserveStock("o-1", 1, order=PLACED),
    ReleaseStock("o-1", 1, reason="stock did not answer 3 attempts of 30000 ms"),
    ScheduleDelivery(
        "o-1",
        1,
        payment=PaymentSucceeded("o-1", 100, charge_id="ch_1"),
        stock=StockReserved("o-1", items=[StockLine("SKU-1", 1)]),
    ),
    StepTimedOut("o-1", "payment", 1, delay_ms=30_000),
    AlarmCleared("o-1"),
]


def test_message_ids_name_each_attempt_of_a_command() -> None:
    # An event is emitted once per order; a command or an alarm once per attempt.
    assert (
        event_id(DeliveryScheduled("o-1", tracking_id="T", carrier="orderflow-post"))
        == "delivery.scheduled:o-1"
    )
    assert event_id(ChargePayment("o-1", 2, order=PLACED)) == "saga.payment.charge:o-1:2"
    alarm = StepTimedOut("o-1", "stock", 3, delay_ms=1)
    assert event_id(alarm) == "saga.timeout:o-1:stock:3"


def test_one_instance_per_class() -> None:
    assert sorted(type(e).__name__ for e in ONE_OF_EACH) == sorted(
        c.__name__ for c in EVENT_CLASSES
    )


#: Every event class at once: decoding picks the class by the ``type`` tag.
ANY_EVENT: Any = functools.reduce(operator.or_, EVENT_CLASSES)


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: subject_of(type(e)))
def test_encode_decode_roundtrip(event: Event) -> None:
    subject = subject_of(type(event))
    raw = msgspec.json.encode(event)
    assert msgspec.json.decode(raw, type=EVENT_TYPES[subject]) == event
    # Whatever a stored event's subject, its ``type`` tag alone says what it is.
    assert msgspec.json.decode(raw, type=ANY_EVENT) == event
