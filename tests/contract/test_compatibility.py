"""orderflow.tools.compatibility and ``runner.py contract --check``: every breaking change between
two contracts named by its path, in the direction it breaks; compatible ones only listed."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orderflow import config
from orderflow.config import MODES
from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.tools import contract
from orderflow.tools.compatibility import Change, Report, compare
from tests.conftest import ROOT

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def doc() -> JSON:
    return contract.document({mode: config.load(ROOT / "streams.yaml", mode) for mode in MODES})


def changed(doc: JSON, change: Callable[[JSON], object]) -> JSON:
    out = copy.deepcopy(doc)
    change(out)
    return out


def schema(doc: JSON, name: str) -> JSON:
    found: JSON = doc["components"]["schemas"][name]
    return found


def breaking(report: Report) -> set[tuple[str | None, str, str]]:
    return {(c.breaks, c.where, c.what) for c in report.breaking}


def test_the_same_contract_is_compatible_both_ways(doc: JSON) -> None:
    report = compare(doc, copy.deepcopy(doc))
    assert report.changes == [] and report.ok and report.backward and report.forward


def test_a_new_required_field_breaks_what_old_writers_wrote_wherever_the_event_is(
    doc: JSON,
) -> None:
    def without_charge_id(old: JSON) -> None:
        paid = schema(old, "PaymentSucceeded")
        del paid["properties"]["charge_id"]
        paid["required"].remove("charge_id")

    report = compare(changed(doc, without_charge_id), doc)
    never = "required by readers, and writers never write it"
    # Embedded in the orchestrator's command too, and named there by its path.
    assert breaking(report) == {
        ("backward", "payments.succeeded $.charge_id", never),
        ("backward", "saga.delivery.schedule $.payment.charge_id", never),
    }
    assert not report.backward and report.forward  # old readers ignore what they do not know


def test_old_readers_that_refuse_unknown_fields_break_on_a_new_one(doc: JSON) -> None:
    def strict_and_without_charge_id(old: JSON) -> None:
        # As the contract was before tolerant readers: unknown properties refused.
        for component in old["components"]["schemas"].values():
            component["additionalProperties"] = False
        del schema(old, "PaymentSucceeded")["properties"]["charge_id"]
        schema(old, "PaymentSucceeded")["required"].remove("charge_id")

    report = compare(changed(doc, strict_and_without_charge_id), doc)
    refused = "writers write it, and readers refuse properties they do not know"
    assert ("forward", "payments.succeeded $.charge_id", refused) in breaking(report)
    assert not report.forward


def test_a_changed_type_breaks_both_ways(doc: JSON) -> None:
    def as_string(old: JSON) -> None:
        schema(old, "PaymentFailed")["properties"]["amount_cents"] = {"type": "string"}

    report = compare(changed(doc, as_string), doc)
    assert breaking(report) == {
        ("forward", "payments.failed $.amount_cents", "written as integer, read as string"),
        ("backward", "payments.failed $.amount_cents", "written as string, read as integer"),
    }


def test_tighter_bounds_break_the_side_that_wrote_more(doc: JSON) -> None:
    looser = changed(doc, lambda old: schema(old, "OrderCreated")["properties"]["items"]
                     .update(maxItems=200))  # fmt: skip
    report = compare(looser, doc)
    tighter = "readers take maxItems 100, writers may write maxItems 200"
    assert ("backward", "orders.created $.items", tighter) in breaking(report)
    assert ("backward", "saga.payment.charge $.order.items", tighter) in breaking(report)
    assert report.forward
    # The other way round: the old readers take fewer than the new writers may write.
    report = compare(doc, looser)
    assert ("forward", "orders.created $.items", tighter) in breaking(report)
    assert report.backward
    item = changed(doc, lambda old: schema(old, "OrderItem")["properties"]["quantity"]
                   .update(maximum=10))  # fmt: skip
    assert (
        "forward", "orders.created $.items[*].quantity",
        "readers take maximum 10, writers may write maximum 1000",
    ) in breaking(compare(item, doc))  # fmt: skip


def test_a_changed_pattern_or_fewer_values_break(doc: JSON) -> None:
    def other_rules(old: JSON) -> None:
        schema(old, "Shortage")["properties"]["sku"]["pattern"] = "^[A-Z]+$"
        schema(old, "OrderCreated")["properties"]["type"]["enum"].append("orders.placed")

    report = compare(changed(doc, other_rules), doc)
    assert (
        "forward", "stock.unavailable $.shortages[*].sku",
        "readers take only the pattern ^[A-Z]+$, writers keep to ^[A-Za-z0-9][A-Za-z0-9_-]*$",
    ) in breaking(report)  # fmt: skip
    assert (
        "backward", "orders.created $.type",
        "'orders.placed' may be written, readers take only 'orders.created'",
    ) in breaking(report)  # fmt: skip


def test_a_removed_message_or_channel_breaks_both_ways(doc: JSON) -> None:
    def no_refunds(new: JSON) -> None:
        del new["components"]["messages"]["payments.refunded"]
        del new["channels"]["order.payments.refunded"]

    report = compare(doc, changed(doc, no_refunds))
    assert {
        (
            "both",
            "payments.refunded",
            "message removed: nothing reads what old writers wrote",
        ),
        (
            "both",
            "channel order.{order_id}.payments.refunded",
            "removed: old writers publish there, old readers listen there",
        ),
    } <= breaking(report)
    assert not report.backward and not report.forward
    added = compare(changed(doc, no_refunds), doc)
    assert added.ok and Change("payments.refunded", "message added") in added.changes


def test_a_new_version_is_covered_by_its_upcasters_while_the_old_one_is_still_read(
    doc: JSON,
) -> None:
    def code_required(new: JSON, read: list[str]) -> None:
        message = new["components"]["messages"]["payments.failed"]
        message[contract.VERSION_KEY] = 2
        message["headers"]["properties"][SCHEMA_VERSION]["enum"] = read
        failed = schema(new, "PaymentFailed")
        failed["properties"]["code"] = {"type": "string"}
        failed["required"].append("code")

    report = compare(doc, changed(doc, lambda new: code_required(new, ["1", "2"])))
    assert report.ok, report.render("old")
    upgraded = "schema version 1 -> 2: what old writers wrote is upgraded by the upcasters"
    assert Change("payments.failed", upgraded) in report.changes
    assert Change("payments.failed $.code", "added in version 2") in report.changes
    dropped = compare(doc, changed(doc, lambda new: code_required(new, ["2"])))
    assert breaking(dropped) == {
        ("backward", "payments.failed", "schema version 1 -> 2, and 1 is read no more")
    }
    # A version going back is no upgrade at all.
    back = compare(changed(doc, lambda old: code_required(old, ["1", "2"])), doc)
    assert ("backward", "payments.failed", "schema version back from 2 to 1") in breaking(back)


def test_an_added_optional_field_is_compatible(doc: JSON) -> None:
    def with_fee(new: JSON) -> None:
        schema(new, "PaymentSucceeded")["properties"]["fee_cents"] = {"type": "integer"}

    report = compare(doc, changed(doc, with_fee))
    assert report.ok
    assert Change("payments.succeeded $.fee_cents", "added, optional") in report.changes
    assert Change("saga.delivery.schedule $.payment.fee_cents", "added, optional") in (
        report.changes
    )
    # Taken out again: old readers never required it, so nothing breaks.
    back = compare(changed(doc, with_fee), doc)
    assert back.ok and Change("payments.succeeded $.fee_cents", "no longer written") in (
        back.changes
    )


def test_the_command_names_each_breaking_change_and_fails(doc: JSON, tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps(changed(doc, lambda o: schema(o, "PaymentFailed")["properties"]
                                      .update(amount_cents={"type": "string"}))))  # fmt: skip
    run = [sys.executable, str(ROOT / "runner.py"), "contract", "--check"]
    same = subprocess.run([*run, str(ROOT / "contract" / "asyncapi.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr
    assert "(backward): yes" in same.stdout and "(forward): yes" in same.stdout
    broken = subprocess.run([*run, str(old)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "(backward): NO" in broken.stdout and "(forward): NO" in broken.stdout
    assert "2 breaking:" in broken.stdout
    assert "forward: payments.failed $.amount_cents: written as integer, read as string" in (
        broken.stdout
    )
    (tmp_path / "junk.json").write_text('{"openapi": "3.1.0"}')
    junk = subprocess.run([*run, str(tmp_path / "junk.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert junk.returncode == 2 and "not an AsyncAPI 3 document" in junk.stderr


#: contract/asyncapi.json as committed before delivery.scheduled's version 2 (the carrier).
BEFORE_CARRIER = Path(__file__).resolve().parent / "fixtures" / "asyncapi_before_carrier.json"


def test_the_carrier_came_in_compatibly_and_would_not_have_for_strict_readers(doc: JSON) -> None:
    before = contract.load(BEFORE_CARRIER)
    assert before["components"]["messages"]["delivery.scheduled"][contract.VERSION_KEY] == 1
    report = compare(before, doc)
    assert report.ok, report.render(BEFORE_CARRIER.name)
    assert [c for c in report.changes if c.where.startswith("delivery.scheduled")] == [
        Change(
            "delivery.scheduled",
            "schema version 1 -> 2: what old writers wrote is upgraded by the upcasters",
        ),
        Change("delivery.scheduled $.carrier", "added in version 2"),
    ]

    # Old readers that refused unknown fields (as every one did before tolerant readers)
    # would have dead-lettered each new delivery.scheduled: the check says so.
    def strict(old: JSON) -> None:
        for component in old["components"]["schemas"].values():
            component["additionalProperties"] = False

    # (Every field added since is flagged the same way: orders.cancelled's request.)
    flagged = breaking(compare(changed(before, strict), doc))
    assert {b for b in flagged if b[1].startswith("delivery.scheduled")} == {
        (
            "forward",
            "delivery.scheduled $.carrier",
            "writers write it, and readers refuse properties they do not know",
        )
    }
    assert {b[1] for b in flagged} >= {"orders.cancelled $.request_id"}
