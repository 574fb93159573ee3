"""The flow survives its processes and its server: stop them mid-flow, each order ends once."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from functions.events import TERMINAL_SUBJECTS
from orderflow import subjects
from orderflow.tools.demo import make_orders
from tests.conftest import StartFlow
from tests.flowkit import Flow, terminal_counts

N = 300


async def _publish_mix(flow: Flow, run: str) -> list[str]:
    orders = [o for _, o in make_orders(N, run_id=run, seed=7)]
    await flow.publish(*orders)
    return [o.order_id for o in orders]


async def _wait_some_finished(flow: Flow, at_least: int) -> int:
    """Block until ``at_least`` orders are finished, so the fault lands mid-flow."""
    js = flow.nc.jetstream()
    stream = flow.topology.events_stream
    for _ in range(400):
        # Counted by the stream's subject index (cheap, however much is stored):
        # the flow is fast enough to finish all N while a full read looks.
        done = 0
        for kind in TERMINAL_SUBJECTS:
            info = await js.stream_info(stream, subjects_filter=subjects.subject(kind, "*"))
            done += sum((info.state.subjects or {}).values())
        if done >= at_least:
            return done
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} orders finished")


async def _assert_all_end_once(flow: Flow, ids: list[str]) -> None:
    seen = await flow.wait_finished(ids, timeout=90)
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    await flow.assert_stock_conserved()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
async def test_every_function_process_stopped_mid_flow(start_flow: StartFlow, sig: int) -> None:
    flow = await start_flow()
    ids = await _publish_mix(flow, f"fn-{sig}")
    done_before = await _wait_some_finished(flow, 30)
    victims = flow.supervisor.pids()
    assert len(victims) == len(flow.topology.functions)
    for pid in victims:
        os.kill(pid, sig)
    # The supervisor notices and starts new processes: every PID is new.
    for _ in range(100):
        alive = flow.supervisor.pids()
        if len(alive) == len(victims) and not set(alive) & set(victims):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"functions were not restarted: {alive}")
    assert done_before < N, "the fault must land in the middle of the flow"
    await _assert_all_end_once(flow, ids)


async def test_nats_server_restarted_on_its_store_mid_flow(start_flow: StartFlow) -> None:
    flow = await start_flow()
    ids = await _publish_mix(flow, "srv")
    done_before = await _wait_some_finished(flow, 30)
    assert done_before < N, "the fault must land in the middle of the flow"
    flow.server.kill()  # SIGKILL: no chance to flush or say goodbye
    await asyncio.sleep(1.0)
    flow.server.start()  # same port, same store dir
    await _assert_all_end_once(flow, ids)
