"""trace, stuck and map: the log explains an order, and names who owes the next step."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from nats.aio.client import Client

from orderflow import config, subjects
from orderflow.config import Topology
from orderflow.runtime.context import FUNCTION
from orderflow.runtime.decoding import order_of
from orderflow.tools import recording
from orderflow.tools.demo import payload
from orderflow.tools.trace import load, mermaid_map, stuck, waiting_on
from tests.conftest import ROOT, StartFlow
from tests.flowkit import Flow, order


def _runner(flow: Flow, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), *args],
        env={**os.environ, "NATS_URL": flow.server.url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("seen", "owed"),
    [
        ({"orders.created"}, {("payment", "payments.succeeded or payments.failed"),
                              ("stock", "stock.reserved or stock.unavailable")}),
        ({"orders.created", "payments.succeeded", "stock.reserved"},
         {("delivery", "delivery.scheduled")}),
        ({"orders.created", "payments.failed", "stock.reserved"}, {("stock", "stock.released")}),
        ({"orders.created", "payments.succeeded", "stock.unavailable"},
         {("payment", "payments.refunded")}),
        ({"orders.created", "payments.failed", "stock.unavailable"},
         {("order", "delivery.cancelled")}),
        ({"orders.created", "payments.failed", "stock.unavailable", "delivery.cancelled"},
         {("order", "orders.cancelled")}),
        # Cancelled on request after the reservation: compensations owed, no delivery.
        ({"orders.created", "payments.succeeded", "stock.reserved", "delivery.cancelled"},
         {("payment", "payments.refunded")}),
        ({"orders.created", "payments.succeeded", "stock.reserved", "delivery.cancelled",
          "payments.refunded"}, {("stock", "stock.released")}),
        ({"orders.created", "payments.succeeded", "stock.reserved", "delivery.cancelled",
          "payments.refunded", "stock.released"}, {("order", "orders.cancelled")}),
        ({"orders.created", "payments.succeeded", "stock.reserved", "delivery.scheduled"},
         {("order", "orders.completed")}),
        ({"orders.created", "payments.succeeded", "stock.reserved", "delivery.scheduled",
          "orders.completed"}, set()),
    ],
)  # fmt: skip
def test_waiting_on_reads_the_choreography_backwards(
    seen: set[str], owed: set[tuple[str, str]], topology: Topology
) -> None:
    found = waiting_on(sorted(seen), topology)
    assert {(function, what) for function, what, _ in found} == owed


@pytest.mark.parametrize(
    ("logged", "owed"),
    [
        (["orders.created"], ("orchestrator", "the next command, or the terminal event")),
        (["orders.created", "saga.payment.charge"],
         ("payment", "its answer to saga.payment.charge")),
        (["orders.created", "saga.payment.charge", "payments.succeeded", "saga.stock.reserve"],
         ("stock", "its answer to saga.stock.reserve")),
        (["orders.created", "saga.payment.charge", "payments.succeeded"],
         ("orchestrator", "the next command, or the terminal event")),
        # A fired deadline changes nothing: the step waits, or its command is
        # sent again (and logged); either way its function owes the answer.
        (["orders.created", "saga.payment.charge", "alarm", "saga.timeout"],
         ("payment", "its answer to saga.payment.charge")),
        (["orders.created", "saga.payment.charge", "payments.succeeded", "saga.stock.reserve",
          "saga.timeout", "saga.stock.reserve", "saga.timeout"],
         ("stock", "its answer to saga.stock.reserve")),
    ],
)  # fmt: skip
def test_a_saga_waits_on_whoever_has_the_last_word(
    logged: list[str], owed: tuple[str, str]
) -> None:
    saga = config.load(ROOT / "streams.yaml", "orchestration")
    assert [(f, what) for f, what, _ in waiting_on(logged, saga)] == [owed]
    assert waiting_on([*logged, "orders.cancelled"], saga) == []


@pytest.mark.parametrize("name", ["happy", "declined", "flaky", "out_of_stock", "both_failures",
                                  "mixed_300"])  # fmt: skip
def test_what_streams_yaml_says_is_owed_is_what_the_functions_did(
    name: str, topology: Topology
) -> None:
    # Every recorded history, order by order: each event a function emitted is
    # the `then` of one of its rules whose `after` had been logged before it,
    # and once the order is over no rule is left owing.
    histories: dict[str, list[tuple[str, str]]] = {}
    for record in recording.read(ROOT / "tests" / "recordings" / f"{name}.jsonl"):
        order_id, kind = subjects.parse(record.subject)
        by = record.headers.get(FUNCTION, "client")
        order_id = order_id or order_of(record.subject, record.data)
        histories.setdefault(order_id or "?", []).append((kind, by))
    assert histories
    for order_id, history in histories.items():
        logged: set[str] = set()
        for kind, by in history:
            if by != "client" and kind != "orders.rejected":
                rules = topology.functions[by].owes
                assert any(kind in r.then and r.due(logged) for r in rules), (
                    f"{order_id}: {by} emitted {kind} after {sorted(logged)}: owed by no rule"
                )
            logged.add(kind)
        assert waiting_on(sorted(logged), topology) == [], (order_id, sorted(logged))


async def test_a_stopped_function_is_named_as_the_one_that_owes_the_next_step(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow({"delivery": 0})  # delivery is not running
    await flow.publish(order("tr-stuck"))
    for _ in range(100):
        seen = (await flow.by_order()).get("tr-stuck", [])
        if {"payments.succeeded", "stock.reserved"} <= set(seen):
            break
        await asyncio.sleep(0.1)
    traces = await load(flow.nc, flow.topology, {"tr-stuck"})
    [owed] = traces["tr-stuck"].owed
    assert (owed.function, owed.what) == ("delivery", "delivery.scheduled")
    assert owed.consumer["pending"] == 2  # both halves wait for it
    assert owed.consumer["fetching"] == 0  # and nobody is asking for them
    assert owed.consumer["instances"] == 0  # no delivery process answers $SRV.PING

    text = _runner(flow, "trace", "tr-stuck")
    assert text.returncode == 0, text.stderr
    assert "NOT FINISHED" in text.stdout
    assert "delivery owes it" in text.stdout and "is any instance running?" in text.stdout

    stuck = _runner(flow, "stuck", "--older-than", "0s")
    assert "tr-stuck" in stuck.stdout and "delivery: delivery.scheduled" in stuck.stdout


async def test_trace_of_a_finished_order_shows_causes_hops_and_retries(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow()
    await flow.publish(order("tr-flaky", token="tok_flaky"))
    await flow.wait_finished(["tr-flaky"])
    out = _runner(flow, "trace", "tr-flaky", "--json")
    assert out.returncode == 0, out.stderr
    trace = json.loads(out.stdout)
    assert trace["outcome"] == "completed" and trace["waiting_for"] == []
    steps = {s["kind"]: s for s in trace["steps"]}
    assert steps["orders.created"]["by"] == "client"
    assert (steps["payments.succeeded"]["by"], steps["payments.succeeded"]["caused_by"]) == (
        "payment", "orders.created")  # fmt: skip
    assert steps["delivery.scheduled"]["caused_by"] in ("payments.succeeded", "stock.reserved")
    assert steps["orders.completed"]["caused_by"] == "delivery.scheduled"
    assert all(s["hop_ms"] >= 0 for s in trace["steps"][1:])
    [retry] = trace["retries"]
    assert (retry["function"], retry["subject"], retry["attempt"]) == (
        "payment",
        "orders.created",
        1,
    )
    assert "GatewayUnavailable" in retry["error"]

    diagram = _runner(flow, "trace", "tr-flaky", "--mermaid").stdout
    assert diagram.startswith("sequenceDiagram")
    assert "client->>payment: orders.created" in diagram
    assert "order->>client: orders.completed" in diagram


def test_map_draws_the_topology(topology: Topology) -> None:
    chart = mermaid_map(topology)
    assert chart.startswith("flowchart LR")
    for name, fn in topology.functions.items():
        for c in fn.consumers:
            for subject in c.events:
                assert f"{subject.replace('.', '_')} --> {name}" in chart
        for subject in fn.emits:
            assert f"{name} --> {subject.replace('.', '_')}" in chart


async def test_an_order_nothing_has_reacted_to_is_traced_and_stuck(
    provisioned: Client, topology: Topology
) -> None:
    # No function runs: the payload-only orders.created is all there is, and
    # it is not under the order's subjects. Trace and stuck find it where it
    # waits, past its readers' ack floors.
    await provisioned.publish("orders.created", payload(order("tr-alone")))
    await provisioned.publish("orders.created", payload(order("tr-other")))
    await provisioned.flush()
    traces = await load(provisioned, topology, {"tr-alone"})
    [step] = traces["tr-alone"].steps
    assert step.kind == "orders.created" and step.by == "client"
    owed = {(o.function, o.consumer.get("instances")) for o in traces["tr-alone"].owed}
    assert owed == {("payment", 0), ("stock", 0)}
    late = await stuck(provisioned, topology, 0.0, datetime.now(UTC))
    assert [t.order_id for t in late] == ["tr-alone", "tr-other"]
