"""Cancel a running order, in both modes: at each point of the flow, with the function that
answers killed right after it decided, and racing the order's own completion."""

from __future__ import annotations

import asyncio
import math
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from functions.events import CancelAnswer, CancelRequest, OrderCancelled
from orderflow.config import Mode
from orderflow.ops import interventions
from orderflow.runtime.intervened import Intervention
from orderflow.tools import trace
from orderflow.tools.streamlog import read_subject
from tests.conftest import StartFlow
from tests.e2e.test_pause import runner
from tests.flowkit import Flow, assert_every_effect_once, gateway_records, order
from tests.waiting import until

MODES: list[Mode] = ["choreography", "orchestration"]


async def ask(
    flow: Flow, order_id: str, attempts: int = interventions.CANCEL_ATTEMPTS, timeout: float = 5.0
) -> CancelAnswer:
    request = CancelRequest(order_id, reason="changed my mind", requested_by="ann")
    return await interventions.cancel(flow.nc, flow.topology, request, attempts, timeout)


async def has(flow: Flow, order_id: str, *kinds: str) -> None:
    async def stored() -> bool:
        return set(kinds) <= set((await flow.by_order()).get(order_id, []))

    await until(stored, 20, f"{order_id}: {', '.join(kinds)}")


async def cancelled_by_request(flow: Flow, order_id: str) -> OrderCancelled:
    [end] = [
        e
        for s in await flow.events()
        if s.kind == "orders.cancelled" and isinstance(e := s.event(), OrderCancelled)
        if e.order_id == order_id
    ]
    assert isinstance(end, OrderCancelled)
    return end


def pause(flow: Flow, function: str) -> None:
    done = runner(flow, "--mode", flow.topology.mode, "pause", function, "--reason", "holding")
    assert done.returncode == 0, done.stderr


def resume(flow: Flow, function: str) -> None:
    done = runner(flow, "--mode", flow.topology.mode, "resume", function)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_at_each_point_of_the_flow(start_flow: StartFlow, mode: Mode) -> None:
    flow = await start_flow(mode=mode)
    accepted: list[str] = []

    # Before payment: payment is held; in choreography it never charges.
    pause(flow, "payment")
    await flow.publish(order("cx-before-pay"))
    first_step = "stock.reserved" if mode == "choreography" else "saga.payment.charge"
    await has(flow, "cx-before-pay", first_step)
    answer = await ask(flow, "cx-before-pay")
    assert (answer.answer, answer.rule) == ("accepted", "cancelled on this request")
    accepted.append("cx-before-pay")
    resume(flow, "payment")

    # After the charge, before the reservation: stock is held.
    pause(flow, "stock")
    await flow.publish(order("cx-charged"))
    await has(flow, "cx-charged", "payments.succeeded")
    assert (await ask(flow, "cx-charged")).answer == "accepted"
    accepted.append("cx-charged")
    resume(flow, "stock")

    # Paid and reserved, delivery held: its delivery.scheduled is refused from now on.
    pause(flow, "delivery")
    await flow.publish(order("cx-reserved"))
    await has(flow, "cx-reserved", "payments.succeeded", "stock.reserved")
    assert (await ask(flow, "cx-reserved")).answer == "accepted"
    accepted.append("cx-reserved")
    resume(flow, "delivery")

    # Delivery scheduled, the end held: too late, and the order completes.
    ender = "order" if mode == "choreography" else "orchestrator"
    if mode == "orchestration":
        # The orchestrator drives every step: held once it has asked for the delivery.
        pause(flow, "delivery")
        await flow.publish(order("cx-scheduled"))
        await has(flow, "cx-scheduled", "saga.delivery.schedule")
        pause(flow, ender)
        resume(flow, "delivery")
    else:
        pause(flow, ender)
        await flow.publish(order("cx-scheduled"))
    await has(flow, "cx-scheduled", "delivery.scheduled")
    late = await ask(flow, "cx-scheduled")
    assert late.answer == "too late" and "delivery is already scheduled" in late.rule
    resume(flow, ender)

    # Completed: too late.
    await flow.publish(order("cx-completed"))
    await has(flow, "cx-completed", "orders.completed")
    done = await ask(flow, "cx-completed")
    assert (done.answer, done.rule) == ("too late", "the order is already completed")

    ids = [*accepted, "cx-scheduled", "cx-completed"]
    seen = await flow.wait_finished(ids, timeout=60)
    await assert_every_effect_once(flow, ids, seen)
    for order_id in accepted:
        assert "orders.cancelled" in seen[order_id] and "delivery.scheduled" not in seen[order_id]
        end = await cancelled_by_request(flow, order_id)
        assert end.request_id == answer_id(order_id) and end.requested_by == "ann"
    assert "orders.completed" in seen["cx-scheduled"]
    # Nothing stays taken: every charge refunded (none made in choreography before
    # payment saw the cancellation), the shelves as they were.
    charges, refunds = await gateway_records(flow, "charge"), await gateway_records(flow, "refund")
    charged = {k.rsplit(".", 1)[1].removeprefix("charge-") for k in charges}
    refunded = {k.rsplit(".", 1)[1].removeprefix("refund-") for k in refunds}
    assert charged & set(accepted) == refunded & set(accepted)
    assert ("cx-before-pay" in charged) == (mode == "orchestration")
    await flow.assert_stock_conserved()
    assert await flow.dead_letters() == []

    # The request and its answer are on the order's timeline.
    [found] = (await trace.load(flow.nc, flow.topology, ["cx-reserved"])).values()
    shown = trace.render(found, datetime.now(UTC))
    assert "INTERVENTION: cancel requested by ann (changed my mind): accepted" in shown, shown
    [closed] = [s for s in found.steps if s.kind == "delivery.cancelled"]
    assert (closed.by, closed.caused_by) == ("cancel", "orders.cancel")
    records = await read_subject(flow.nc, "INTERVENTIONS", "interventions.order.>")
    answers = {
        (r.order_id, r.answer)
        for r in (msgspec.json.decode(s.data, type=Intervention) for s in records)
    }
    assert ("cx-reserved", "accepted") in answers and ("cx-completed", "too late") in answers


def answer_id(order_id: str) -> str:
    from functions.cancel import identified

    return identified(CancelRequest(order_id, "changed my mind", "ann")).request_id


@pytest.mark.parametrize("mode", MODES)
async def test_the_function_killed_right_after_it_decided_answers_the_same_when_asked_again(
    start_flow: StartFlow, mode: Mode, tmp_path: Path
) -> None:
    marker = tmp_path / "crashed"
    env = {
        "ORDERFLOW_CRASH": "after-decide:cancel:cx-crash",
        "ORDERFLOW_CRASH_MARKER": str(marker),
    }
    flow = await start_flow(mode=mode, env=env)
    pause(flow, "delivery")  # held paid and reserved
    await flow.publish(order("cx-crash"))
    await has(flow, "cx-crash", "payments.succeeded", "stock.reserved")
    # The first answer dies with the process (SIGKILL); the supervisor restarts
    # it, and the same request, asked again, finds its own decision.
    answer = await ask(flow, "cx-crash", attempts=20, timeout=1.0)
    assert marker.exists(), "the cancel function was never killed"
    assert (answer.answer, answer.rule) == ("accepted", "cancelled on this request")
    resume(flow, "delivery")
    seen = await flow.wait_finished(["cx-crash"], timeout=60)
    await assert_every_effect_once(flow, ["cx-crash"], seen)
    assert seen["cx-crash"].count("delivery.cancelled") == 1
    assert "delivery.scheduled" not in seen["cx-crash"]
    await flow.assert_stock_conserved()


@pytest.mark.parametrize("mode", MODES)
async def test_cancels_racing_completion_each_answer_matches_how_the_order_ended(
    start_flow: StartFlow, mode: Mode
) -> None:
    flow = await start_flow(mode=mode)
    # How long an order takes here, in this mode: the cancels are spread over
    # twice that, from before payment to after completion.
    for probe in ("cx-warm-up", "cx-probe"):  # the second one warm
        started = time.monotonic()
        await flow.publish(order(probe))
        await has(flow, probe, "orders.completed")
        took = time.monotonic() - started
    rng = random.Random(15)
    ids = [f"cx-race-{i}" for i in range(40)]

    async def one(order_id: str) -> CancelAnswer:
        await asyncio.sleep(rng.uniform(0.0, 2.0))  # the orders arrive over two seconds
        await flow.publish(order(order_id))
        await asyncio.sleep(10 ** rng.uniform(-3, math.log10(2 * took)))  # 1 ms to twice that
        return await ask(flow, order_id, attempts=10, timeout=2.0)

    answers = await asyncio.gather(*(one(o) for o in ids))
    seen = await flow.wait_finished(ids, timeout=90)
    await assert_every_effect_once(flow, ids, seen)
    verdicts = {a.order_id: a.answer for a in answers}
    for order_id in ids:
        if verdicts[order_id] == "accepted":
            end = await cancelled_by_request(flow, order_id)
            assert end.request_id == answer_id(order_id), (order_id, seen[order_id])
            assert "delivery.scheduled" not in seen[order_id]
        elif verdicts[order_id] == "too late":
            assert "orders.completed" in seen[order_id], (order_id, seen[order_id])
        else:  # asked before any function had seen the order
            assert verdicts[order_id] == "unknown"
            assert "orders.completed" in seen[order_id]
    # The race was run, not avoided: both answers happened.
    assert {"accepted", "too late"} <= set(verdicts.values()), verdicts
    await flow.assert_stock_conserved()
    assert await flow.dead_letters() == []


async def test_a_bad_request_is_answered_with_the_reason_and_the_function_keeps_answering(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow()
    assert (await ask(flow, "cx-nothing", attempts=40, timeout=1.0)).answer == "unknown"
    bad = [b"not json", b'{"reason": "no order"}', b'{"order_id": "a b"}', b"[1, 2]"]
    for body in bad:
        reply = await flow.nc.request("orders.cancel", body, timeout=10)
        error = msgspec.json.decode(reply.data)["error"]
        assert error.startswith("invalid request"), (body, error)
    # Still answering, in the same process.
    before = sorted(flow.supervisor.pids())
    assert (await ask(flow, "cx-nothing")).answer == "unknown"
    assert sorted(flow.supervisor.pids()) == before
    assert len(flow.supervisor.pids()) == len(flow.topology.functions)  # nothing crashed
