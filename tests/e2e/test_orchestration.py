"""Orchestration mode end to end: same outcomes and effects as choreography, crashes, deadlines.

Every function runs as its own OS process on a real nats-server, as in
production; the orchestrator's deadlines are real scheduled messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from functions.events import OrderCreated
from functions.orchestrator import Saga, saga_key
from orderflow import config
from orderflow.ops.provision import ModeSwitchRefused, provision
from orderflow.ops.server import EmbeddedServer
from orderflow.runtime.gateway import ChargeRecord, RefundRecord
from orderflow.runtime.kv import KvStore
from orderflow.tools import trace
from orderflow.tools.streamlog import read_stream
from tests.conftest import ROOT, StartFlow
from tests.flowkit import Flow, order, terminal_counts

# Every path through the flow, twice over.
PATHS: dict[str, dict[str, object]] = {
    "happy": {},
    "declined": {"token": "tok_declined"},
    "flaky": {"token": "tok_flaky"},
    "out_of_stock": {"SOLD_OUT_1": 1},
    "both_fail": {"token": "tok_declined", "SOLD_OUT_1": 1},
}
EVERY_PATH = [
    order(f"eq-{path}-{i}", **({"BOOK_42": 2, "MUG_7": 1} | args))  # type: ignore[arg-type]
    for path, args in PATHS.items()
    for i in range(2)
]

Effects = tuple[str, int, int, bool]


async def _effects(flow: Flow, orders: list[OrderCreated]) -> dict[str, Effects]:
    """Per order: how it ended, cents charged, cents refunded, whether a delivery was scheduled."""
    ids = [o.order_id for o in orders]
    seen = await flow.wait_finished(ids, timeout=60)
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    await flow.assert_stock_conserved()
    gateway = KvStore(flow.nc, "gateway")
    effects = {}
    for order_id in ids:
        charge = await gateway.get(f"charge.charge-{order_id}", ChargeRecord)
        refund = await gateway.get(f"refund.refund-{order_id}", RefundRecord)
        charged = charge.value.amount_cents if charge and charge.value.charge_id else 0
        outcome = next(s for s in seen[order_id] if s in ("orders.completed", "orders.cancelled"))
        effects[order_id] = (
            outcome,
            charged,
            refund.value.amount_cents if refund else 0,
            "delivery.scheduled" in seen[order_id],
        )
    return effects


async def _run(tmp_path: Path, mode: config.Mode, orders: list[OrderCreated]) -> dict[str, Effects]:
    """The orders through one mode, on a fresh server and fresh state."""
    server = EmbeddedServer(tmp_path / mode)
    server.start()
    nc = None
    flow = None
    try:
        from orderflow.runtime.connect import connect

        nc = await connect(server.url, name=f"tests-{mode}")
        topology = config.load(ROOT / "streams.yaml", mode)
        await provision(nc, topology, ROOT)
        flow = Flow(server, nc, topology, ROOT / "streams.yaml", {}, {})
        flow.start()
        await flow.publish(*orders)
        effects = await _effects(flow, orders)
        levels = await flow.levels()
        return effects | {"levels": ("", 0, sum(levels.values()), False)}
    finally:
        if flow is not None:
            await flow.stop()
        if nc is not None:
            await nc.close()
        server.stop()


async def test_both_modes_end_every_order_the_same_way(tmp_path: Path) -> None:
    choreography = await _run(tmp_path, "choreography", EVERY_PATH)
    orchestration = await _run(tmp_path, "orchestration", EVERY_PATH)
    assert orchestration == choreography
    # And the paths really differ, so the comparison means something.
    outcomes = {order_id.rsplit("-", 1)[0]: e for order_id, e in choreography.items()}
    assert outcomes["eq-happy"][0] == "orders.completed"
    total = next(o.total_cents for o in EVERY_PATH if o.order_id.startswith("eq-out_of_stock"))
    assert outcomes["eq-out_of_stock"][1:3] == (total, total)  # charged, then refunded
    assert outcomes["eq-declined"][:3] == ("orders.cancelled", 0, 0)


CRASHES = [
    # (failpoint, input subject, order, outcome)
    ("after-handle", "orders.created", order("oc-1"), "completed"),
    ("after-handle", "payments.succeeded", order("oc-1"), "completed"),
    ("after-publish", "stock.reserved", order("oc-1"), "completed"),
    ("after-handle", "stock.unavailable", order("oc-1", BOOK_42=1, SOLD_OUT_1=1), "cancelled"),
]


@pytest.mark.parametrize(
    ("point", "subject", "o", "outcome"), CRASHES, ids=[f"{c[0]}-on-{c[1]}" for c in CRASHES]
)
async def test_orchestrator_killed_mid_saga_loses_no_step_and_repeats_none(
    start_flow: StartFlow,
    variant_config: Callable[..., Path],
    tmp_path: Path,
    point: str,
    subject: str,
    o: OrderCreated,
    outcome: str,
) -> None:
    config_path = variant_config(("ack_wait: 5s", "ack_wait: 1s"))
    marker = tmp_path / "crashed"
    env = {
        "ORDERFLOW_CRASH": f"{point}:orchestrator:{o.order_id}:{subject}",
        "ORDERFLOW_CRASH_MARKER": str(marker),
    }
    flow = await start_flow(config_path=config_path, env=env, mode="orchestration")
    before = set(flow.supervisor.pids("orchestrator"))
    await flow.publish(o)
    seen = await flow.wait_finished([o.order_id], timeout=30)
    assert marker.exists(), "the failpoint was never reached"
    assert not set(flow.supervisor.pids("orchestrator")) & before, "the process really died"
    subjects = seen[o.order_id]
    assert f"orders.{outcome}" in subjects
    for each in set(subjects):  # every command and every answer exactly once
        assert subjects.count(each) == 1, subjects
    await flow.assert_stock_conserved()


async def test_a_silent_step_is_retried_then_compensated(
    start_flow: StartFlow, variant_config: Callable[..., Path], provisioned: Client
) -> None:
    config_path = variant_config(
        ("stock: {timeout: 30s, on_timeout: compensate, attempts: 3}",
         "stock: {timeout: 1s, on_timeout: compensate, attempts: 2}"),
        ("release: {timeout: 30s", "release: {timeout: 1s"),
    )  # fmt: skip
    o = order("silent-1")
    # Everything but stock: the reservation goes unanswered.
    flow = await start_flow(config_path=config_path, replicas={"stock": 0}, mode="orchestration")
    await flow.publish(o)
    sagas = KvStore(provisioned, "sagas")
    for _ in range(100):
        saga = await sagas.get(saga_key(o.order_id), Saga)
        if saga and saga.value.step == "release" and saga.value.attempt >= 2:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the saga never gave up on stock: {saga}")
    # The log says who owes the next step: stock, with no instance running.
    for _ in range(20):  # between an alarm and the command it brings, the orchestrator owes
        traces = await trace.load(provisioned, flow.topology, {o.order_id})
        [owed] = traces[o.order_id].owed
        if owed.function == "stock":
            break
        await asyncio.sleep(0.1)
    assert (owed.function, owed.what) == ("stock", "its answer to saga.stock.release")
    assert owed.consumer["instances"] == 0
    # The fired deadlines are in the timeline, as the cause of each command sent again.
    steps = {s.event_id: s for s in traces[o.order_id].steps}
    again = steps[f"saga.stock.reserve:{o.order_id}:2"]
    assert again.caused_by == "saga.timeout"
    # Stock comes back: it reserves (late) and releases, then payment refunds.
    await start_flow(
        config_path=config_path,
        replicas={"orchestrator": 0, "payment": 0, "delivery": 0},
        mode="orchestration",
    )
    seen = await flow.wait_finished([o.order_id], timeout=30)
    subjects = seen[o.order_id]
    assert subjects.count("saga.stock.reserve") == 2  # attempt 1, then attempt 2
    assert {"stock.reserved", "stock.released", "payments.refunded"} <= set(subjects)
    assert subjects[-1] == "orders.cancelled"
    cancelled = [s for s in await flow.events() if s.kind == "orders.cancelled"]
    reason = msgspec.json.decode(cancelled[0].data)["reason"]
    assert reason == "stock did not answer 2 attempts of 1000 ms"
    await flow.assert_stock_conserved()
    # The saga is over: no alarm is left to fire (the withdrawal itself
    # expires after 1 s); what remains are the alarms that did fire.
    await asyncio.sleep(1.5)
    left = {s.kind for s in await read_stream(provisioned, "TIMERS")}
    assert left == {"saga.timeout"}


async def test_switching_modes_waits_for_orders_in_flight(
    start_flow: StartFlow, provisioned: Client
) -> None:
    orchestration = config.load(ROOT / "streams.yaml", "orchestration")
    first = order("switch-1")
    await provisioned.publish("orders.created", msgspec.json.encode(first))
    await provisioned.flush()
    # Nothing runs yet: choreography's consumers hold the order, so no switch.
    with pytest.raises(ModeSwitchRefused, match="payment of the choreography wiring"):
        await provision(provisioned, orchestration, ROOT)
    flow = await start_flow()
    await flow.wait_finished([first.order_id])
    await flow.wait_quiet()
    await flow.stop()
    report = await provision(provisioned, orchestration, ROOT)
    assert "consumer ORDERS/order: removed (not in the orchestration wiring)" in (report.lines)
    flow = await start_flow(mode="orchestration")
    second = order("switch-2")
    await flow.publish(second)
    seen = await flow.wait_finished([second.order_id])
    await flow.wait_quiet()
    # The finished order was not driven again by the new wiring.
    assert "saga.payment.charge" not in seen[first.order_id]
    assert terminal_counts(seen, [first.order_id, second.order_id]) == {
        first.order_id: 1,
        second.order_id: 1,
    }
