"""functions.upcasters: every step from version 1 to each kind's current one, and nothing else;
each step on recorded events."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from functions import delivery, upcasters
from functions.events import EVENT_CLASSES, DeliveryScheduled, Event, StockReserved
from functions.upcasters import UPCASTERS, Payload, gaps
from orderflow.tools import recording


def test_every_kind_can_be_upgraded_from_every_older_version() -> None:
    assert gaps(UPCASTERS) == []
    for cls in EVENT_CLASSES:
        assert cls.schema_version >= 1, cls


class Newer(DeliveryScheduled, frozen=True):
    """A kind at version 3, to see what a table missing a step is told."""

    schema_version = 3


def _step(payload: Payload) -> Payload:
    return payload


def test_a_missing_or_stray_step_is_named() -> None:
    classes: list[type[Event]] = [Newer]
    assert gaps({("delivery.scheduled", 1): _step}, classes) == [
        "delivery.scheduled: no upcaster from version 2 (its schema_version is 3)"
    ]
    stray = {("delivery.scheduled", 1): _step, ("delivery.scheduled", 2): _step,
             ("delivery.scheduled", 3): _step, ("no.such", 1): _step}  # fmt: skip
    assert gaps(stray, classes) == [
        "delivery.scheduled: an upcaster from version 3, but its schema_version is 3",
        "no.such: an upcaster from version 1, but no such kind",
    ]


def test_steps_are_applied_in_turn_and_only_to_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(UPCASTERS, ("test.kind", 1), lambda p: {**p, "seen": [1]})
    monkeypatch.setitem(UPCASTERS, ("test.kind", 2), lambda p: {**p, "seen": [*p["seen"], 2]})
    original: Payload = {"order_id": "o-1"}
    assert upcasters.upgrade("test.kind", 1, original, 3) == {"order_id": "o-1", "seen": [1, 2]}
    assert original == {"order_id": "o-1"}  # pure: the input is left as it was
    assert upcasters.upgrade("test.kind", 2, {"seen": [1]}, 3) == {"seen": [1, 2]}
    assert upcasters.upgrade("test.kind", 3, original, 3) is original
    # Not an object: nothing to upgrade, the decoder says what is wrong with it.
    assert upcasters.upgrade("test.kind", 1, ["o-1"], 3) == ["o-1"]


OLD_SCHEMA = Path(__file__).resolve().parents[1] / "recordings" / "mixed_300_schema_v1.jsonl"


def test_every_recorded_version_1_delivery_upgrades_to_what_delivery_writes_now() -> None:
    recorded = [
        msgspec.json.decode(r.data)
        for r in recording.read(OLD_SCHEMA)
        if r.subject.endswith(".delivery.scheduled")
    ]
    assert len(recorded) > 100 and not any("carrier" in payload for payload in recorded)
    for payload in recorded:
        before = dict(payload)
        upgraded = upcasters.upgrade("delivery.scheduled", 1, payload, 2)
        assert payload == before  # pure
        event = msgspec.convert(upgraded, DeliveryScheduled)
        # The very event today's delivery writes for the order.
        assert [event] == delivery.decide(event.order_id, StockReserved(event.order_id, []))


def test_the_carrier_of_version_1_is_a_fact_about_then() -> None:
    assert upcasters.V1_CARRIER == delivery.CARRIER == "orderflow-post"  # as of version 2
    one: Payload = {"type": "delivery.scheduled", "order_id": "o-1", "tracking_id": "TRK-1"}
    assert upcasters.delivery_scheduled_1_to_2(one) == one | {"carrier": "orderflow-post"}
    # One that says its carrier (its writer left the header out) keeps it.
    said = one | {"carrier": "dhl"}
    assert upcasters.delivery_scheduled_1_to_2(said) == said
