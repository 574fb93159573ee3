"""orderflow.runtime.decoding: the schema version a message says; read as the current one."""

from __future__ import annotations

import msgspec
import pytest

from functions.events import DeliveryScheduled, OrderCreated
from functions.upcasters import UPCASTERS, V1_CARRIER, Payload
from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.runtime.decoding import Invalid, decode, version_in
from orderflow.tools.demo import payload
from tests.flowkit import order

MAX_PAYLOAD = 65536


def test_a_message_without_the_header_is_version_one() -> None:
    assert version_in({}) == 1
    assert version_in({"Nats-Msg-Id": "x"}) == 1
    assert version_in({SCHEMA_VERSION: "1"}) == 1
    assert version_in({SCHEMA_VERSION: "12"}) == 12


@pytest.mark.parametrize("given", ["", "x", "0", "-1", "1.0", " 2", "٣", "v2"])
def test_a_header_that_is_not_a_version_is_named(given: str) -> None:
    with pytest.raises(ValueError, match=f"header {SCHEMA_VERSION}: .* is not a schema version"):
        version_in({SCHEMA_VERSION: given})


def test_an_order_with_a_bad_version_header_is_invalid_and_answered() -> None:
    got = decode("orders.created", payload(order("o-1")), {SCHEMA_VERSION: "v2"}, MAX_PAYLOAD)
    assert got == Invalid(
        f"invalid orders.created: header {SCHEMA_VERSION}: 'v2' is not a schema version (1, 2, ...)"
    )
    assert got.rejectable


def test_a_newer_version_is_read_as_the_current_one() -> None:
    # A newer writer (a rolling deploy, a storefront ahead of us) may add fields: read past them.
    body = msgspec.json.decode(payload(order("o-1")))
    body["coupon_code"] = "FREE"
    newer = {SCHEMA_VERSION: str(OrderCreated.schema_version + 5)}
    assert decode("orders.created", msgspec.json.encode(body), newer, MAX_PAYLOAD) == order("o-1")
    # What it cannot read, it says who wrote.
    del body["payment_token"]
    got = decode("orders.created", msgspec.json.encode(body), newer, MAX_PAYLOAD)
    assert isinstance(got, Invalid)
    assert got.reason == (
        "invalid orders.created: Object missing required field `payment_token` (written with "
        f"schema version {OrderCreated.schema_version + 5}; this reader knows up to "
        f"{OrderCreated.schema_version})"
    )


def test_the_current_version_reads_as_before() -> None:
    current = {SCHEMA_VERSION: str(OrderCreated.schema_version)}
    assert decode("orders.created", payload(order("o-1")), current, MAX_PAYLOAD) == order("o-1")
    got = decode("orders.created", payload(order("o-1", BOOK_42=0)), current, MAX_PAYLOAD)
    assert isinstance(got, Invalid) and got.reason.endswith("- at `$.items[0].quantity`")
    assert "written with" not in got.reason


V1 = b'{"type": "delivery.scheduled", "order_id": "o-1", "tracking_id": "TRK-1"}'
SCHEDULED = "order.o-1.delivery.scheduled"


def test_an_older_version_is_upgraded_before_it_is_decoded() -> None:
    upgraded = DeliveryScheduled("o-1", tracking_id="TRK-1", carrier=V1_CARRIER)
    assert decode(SCHEDULED, V1, {}, MAX_PAYLOAD) == upgraded  # no header: version 1
    assert decode(SCHEDULED, V1, {SCHEMA_VERSION: "1"}, MAX_PAYLOAD) == upgraded


def test_an_upcaster_is_no_default_for_the_current_version() -> None:
    # A version 2 writer must say the carrier: only version 1 is upgraded.
    got = decode(SCHEDULED, V1, {SCHEMA_VERSION: "2"}, MAX_PAYLOAD)
    assert got == Invalid("invalid delivery.scheduled: Object missing required field `carrier`")


def test_what_an_old_version_lacks_is_still_named_after_the_upgrade() -> None:
    got = decode(SCHEDULED, b'{"order_id": "o-1"}', {}, MAX_PAYLOAD)
    assert got == Invalid("invalid delivery.scheduled: Object missing required field `tracking_id`")
    got = decode(SCHEDULED, b'["o-1", "TRK-1"]', {}, MAX_PAYLOAD)
    assert got == Invalid("invalid delivery.scheduled: Expected `object`, got `array`")
    got = decode(SCHEDULED, b'{"order_id": "o-1", "tracking_id": 7}', {}, MAX_PAYLOAD)
    assert got == Invalid(
        "invalid delivery.scheduled: Expected `str`, got `int` - at `$.tracking_id`"
    )


def test_an_upcaster_that_fails_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(payload: Payload) -> Payload:
        raise KeyError("tracking_id")

    monkeypatch.setitem(UPCASTERS, ("delivery.scheduled", 1), broken)
    got = decode(SCHEDULED, V1, {}, MAX_PAYLOAD)
    assert got == Invalid(
        "invalid delivery.scheduled: version 1 could not be upgraded to 2: KeyError: 'tracking_id'"
    )
