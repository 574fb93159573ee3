"""The published contract (orderflow/tools/contract.py): committed exactly as the code generates
it, valid AsyncAPI 3 by the AsyncAPI project's own parser, and saying what the flow does.

The parser is Node.js (``@asyncapi/parser``, pinned in ``tests/contract/asyncapi``). Without
node or its packages the parser's test is skipped, saying why; with ``ORDERFLOW_CI`` set
(``.ci/run`` sets it, after installing both) it fails instead, so CI never passes without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.events import EVENT_CLASSES, subject_of
from orderflow import config, subjects
from orderflow.config import MODES, Mode, Topology
from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.tools import contract
from tests.conftest import ROOT
from tests.contract.writers import off_contract
from tests.functions.test_events import ONE_OF_EACH

COMMITTED = ROOT / "contract"
VALIDATOR = Path(__file__).resolve().parent / "asyncapi"


def wirings() -> dict[Mode, Topology]:
    return {mode: config.load(ROOT / "streams.yaml", mode) for mode in MODES}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return contract.document(wirings())


def test_the_committed_contract_is_what_the_code_generates() -> None:
    generated = contract.files(wirings())
    committed = {
        str(path.relative_to(COMMITTED)): path.read_text()
        for path in [COMMITTED / contract.DOCUMENT, *(COMMITTED / contract.SCHEMAS).glob("*.json")]
    }
    stale = sorted(name for name in generated.keys() | committed.keys()
                   if generated.get(name) != committed.get(name))  # fmt: skip
    assert not stale, f"contract/ is stale ({', '.join(stale)}): run `python runner.py contract`"


def node() -> str:
    """The node binary, with the parser installed; else skip (a developer) or fail (CI)."""
    found = shutil.which("node")
    if found is None:
        missing = "node is not installed (Node.js 18+)"
    elif not (VALIDATOR / "node_modules" / "@asyncapi" / "parser").is_dir():
        missing = (
            f"@asyncapi/parser is not installed: npm ci --prefix {VALIDATOR.relative_to(ROOT)}"
        )
    else:
        return found
    if os.environ.get("ORDERFLOW_CI"):
        pytest.fail(f"{missing}: CI must validate the contract (.ci/run installs both)")
    pytest.skip(f"{missing}; .ci/run installs it, and there this test fails instead")


def test_the_asyncapi_parser_finds_the_contract_valid_and_a_broken_one_not(
    tmp_path: Path,
) -> None:
    binary = node()
    broken = json.loads((COMMITTED / contract.DOCUMENT).read_text())
    # An operation on a channel that does not exist; a payload that is no schema.
    broken["operations"]["payment.send.order.payments.succeeded"]["channel"]["$ref"] = (
        "#/channels/no.such.channel"
    )
    broken["components"]["messages"]["orders.created"]["payload"] = {"type": "objekt"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    run = subprocess.run(
        [binary, str(VALIDATOR / "validate.mjs"), str(COMMITTED / contract.DOCUMENT),
         str(tmp_path / "broken.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr  # one of the two is invalid
    good, bad = json.loads(run.stdout)
    # Not even a warning or a hint for the committed one.
    assert good["valid"] and good["diagnostics"] == [], good
    assert not bad["valid"]
    errors = {
        (d["code"], tuple(d["path"][:2])) for d in bad["diagnostics"] if d["severity"] == "error"
    }
    assert ("invalid-ref", ("operations", "payment.send.order.payments.succeeded")) in errors
    assert any(path == ("components", "messages") for _, path in errors), errors


def test_every_kind_is_a_message_with_its_schema_version_and_the_order_as_correlation(
    doc: dict[str, Any],
) -> None:
    messages, schemas = doc["components"]["messages"], doc["components"]["schemas"]
    requests = {"orders.cancel", "orders.cancel.answer", "orders.cancel.problem"}
    assert set(messages) == {subject_of(cls) for cls in EVENT_CLASSES} | requests
    for cls in EVENT_CLASSES:
        message = messages[subject_of(cls)]
        assert message["payload"] == {"$ref": f"#/components/schemas/{cls.__name__}"}
        payload = schemas[cls.__name__]
        assert "order_id" in payload["required"]  # where the correlation id is found
        assert message["correlationId"] == {"$ref": "#/components/correlationIds/order_id"}
        version = message["headers"]["properties"][SCHEMA_VERSION]
        assert message[contract.VERSION_KEY] == cls.schema_version
        assert version["enum"] == [str(v) for v in range(1, cls.schema_version + 1)]
        assert version["default"] == "1"  # none means 1
    assert doc["components"]["correlationIds"]["order_id"]["location"] == (
        "$message.payload#/order_id"
    )


def test_channels_and_operations_are_the_wiring_of_streams_yaml(doc: dict[str, Any]) -> None:
    channels, operations = doc["channels"], doc["operations"]
    for channel in channels.values():
        has_parameter = "{order_id}" in (channel["address"] or "")
        assert ("parameters" in channel) == has_parameter, channel
    assert channels["orders.created"]["address"] == subjects.INGRESS
    assert channels["order.payments.succeeded"]["address"] == "order.{order_id}.payments.succeeded"

    def operation(name: str, action: str, subject: str, kind: str, mode: Mode) -> None:
        address = subject.replace("*", "{order_id}")
        [channel_id] = [c for c, doc in channels.items() if doc["address"] == address]
        op = operations[f"{name}.{action}.{channel_id}"]
        assert op["channel"] == {"$ref": f"#/channels/{channel_id}"}
        assert {"$ref": f"#/channels/{channel_id}/messages/{kind}"} in op["messages"]
        assert kind in channels[channel_id]["messages"]
        assert {"name": mode} in op["tags"]

    for mode, topology in wirings().items():
        for name, fn in topology.functions.items():
            for consumer in fn.consumers:
                for kind in consumer.events:
                    for subject in subjects.filters(kind):
                        operation(name, "receive", subject, kind, mode)
            for kind in fn.emits:
                operation(name, "send", subjects.published_on(kind, "*"), kind, mode)
    # The outside world: publishes orders, watches how they end.
    operation("client", "send", subjects.INGRESS, "orders.created", "choreography")
    operation("client", "receive", "order.*.orders.completed", "orders.completed", "orchestration")
    assert "payment.receive.order.stock.unavailable" in operations
    assert "orchestration" not in str(operations["order.send.order.orders.completed"]["tags"])


def test_schemas_are_the_readers_and_what_functions_write_is_exactly_them(
    doc: dict[str, Any],
) -> None:
    components = doc["components"]["schemas"]
    for name, schema in components.items():
        # Tolerant readers: nothing forbids an unknown property; the tag may be left out.
        assert schema.get("additionalProperties", True) is not False, name
        assert "type" not in schema.get("required", []), name
    # Strict writers: one event of every kind, as the functions encode it.
    assert {type(e) for e in ONE_OF_EACH} == set(EVENT_CLASSES)
    for event in ONE_OF_EACH:
        written = msgspec.json.decode(msgspec.json.encode(event))
        ref = {"$ref": f"#/components/schemas/{type(event).__name__}"}
        assert off_contract(written, ref, components) == [], event
    # The check itself notices what is off the contract.
    placed = msgspec.json.decode(msgspec.json.encode(ONE_OF_EACH[0]))
    placed["coupon_code"], placed["items"][0]["colour"] = "FREE", "red"
    del placed["payment_token"]
    assert off_contract(placed, {"$ref": "#/components/schemas/OrderCreated"}, components) == [
        "$.coupon_code: not in the contract",
        "$.payment_token: missing",
        "$.items[0].colour: not in the contract",
    ]


def test_every_event_has_its_own_schema_file_like_its_component(doc: dict[str, Any]) -> None:
    files = contract.files(wirings())
    for cls in EVENT_CLASSES:
        kind = subject_of(cls)
        schema = json.loads(files[f"{contract.SCHEMAS}/{kind}.json"])
        assert schema["title"] == kind and schema[contract.VERSION_KEY] == cls.schema_version
        assert schema["$ref"] == f"#/$defs/{cls.__name__}"
        component = doc["components"]["schemas"][cls.__name__]
        assert json.dumps(schema["$defs"][cls.__name__]).replace("#/$defs/", "") == json.dumps(
            component
        ).replace("#/components/schemas/", "")


def test_the_command_writes_it_where_asked(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "orders.gone.json").write_text("{}")  # a kind that is no more
    run = subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "contract", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "schemas").iterdir()) == sorted(
        f"{subject_of(cls)}.json" for cls in EVENT_CLASSES
    )
    assert json.loads((tmp_path / "asyncapi.json").read_text()) == json.loads(
        (COMMITTED / "asyncapi.json").read_text()
    )


def test_a_served_request_is_a_channel_with_its_reply(doc: dict[str, Any]) -> None:
    channels, operations = doc["channels"], doc["operations"]
    assert channels["orders.cancel"]["address"] == "orders.cancel"
    assert channels["orders.cancel.reply"]["address"] is None  # the requester's inbox
    for name in ("cancel.receive.orders.cancel", "client.send.orders.cancel"):
        reply = operations[name]["reply"]
        assert reply["channel"] == {"$ref": "#/channels/orders.cancel.reply"}
        assert len(reply["messages"]) == 2  # the answer, or a problem
    request = doc["components"]["schemas"]["CancelRequest"]
    assert request["required"] == ["order_id"]
    answer = doc["components"]["schemas"]["CancelAnswer"]
    assert answer["properties"]["answer"]["enum"] == ["accepted", "too late", "unknown"]
