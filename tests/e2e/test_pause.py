"""Pause and resume a function under load: nothing lost, nothing dead-lettered, the backlog drains,
and the pause is recorded and shown where the flow is looked at."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from orderflow.ops.interventions import paused
from orderflow.runtime.gateway import DOWN_TOKEN, SimulatedGateway
from orderflow.runtime.intervened import Intervention
from orderflow.runtime.kv import KvStore
from orderflow.tools import status, trace
from orderflow.tools.streamlog import read_subject
from tests.conftest import ROOT, StartFlow
from tests.e2e.test_gateway_outage import SHORTER
from tests.flowkit import Flow, order, terminal_counts
from tests.waiting import until, value_when


def runner(flow: Flow, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": flow.server.url}
    return subprocess.run([sys.executable, str(ROOT / "runner.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


async def test_a_paused_function_holds_its_backlog_and_resume_drains_it(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow()
    done = runner(flow, "pause", "delivery", "--reason", "carrier API down")
    assert done.returncode == 0, done.stderr
    assert "delivery paused until resumed" in done.stderr

    ids = [f"pz-{i}" for i in range(30)]
    await flow.publish(*(order(o) for o in ids))

    # Paid and reserved, and there they wait: no delivery scheduled, nothing
    # dead-lettered, nothing lost.
    async def waiting() -> bool:
        seen = await flow.by_order()
        return all({"payments.succeeded", "stock.reserved"} <= set(seen.get(o, [])) for o in ids)

    await until(waiting, 15, "the orders paid and reserved")
    await asyncio.sleep(2.0)  # longer than a pull request's life: still nothing delivered
    seen = await flow.by_order()
    assert not any("delivery.scheduled" in seen[o] for o in ids)
    assert await flow.dead_letters() == []
    info = await flow.nc.jetstream().consumer_info("ORDERS", "delivery")
    assert info.paused and info.num_pending == 60  # both halves of each join

    # Said where the flow is looked at: status, and trace of a waiting order.
    pause = await paused(flow.nc, flow.topology, "delivery")
    assert pause is not None and pause.reason == "carrier API down" and pause.until == ""
    figures = await status.collect(flow.nc, flow.topology)
    assert figures["functions"]["delivery"]["paused"].startswith("PAUSED since ")
    assert figures["functions"]["payment"]["paused"] is None
    [found] = (await trace.load(flow.nc, flow.topology, ["pz-0"])).values()
    [owed] = found.owed
    assert owed.function == "delivery" and owed.paused.startswith("PAUSED since ")
    assert "runner.py resume delivery" in trace.render(found, datetime.now(UTC))
    shown = runner(flow, "status")
    assert "delivery: PAUSED since" in shown.stdout and "carrier API down" in shown.stdout

    done = runner(flow, "resume", "delivery", "--reason", "carrier back")
    assert done.returncode == 0, done.stderr
    seen = await flow.wait_finished(ids, timeout=60)
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    assert all("orders.completed" in seen[o] for o in ids)
    assert await flow.dead_letters() == []
    assert await paused(flow.nc, flow.topology, "delivery") is None

    # Both interventions are in the log, in order, with who, when and why.
    stored = await read_subject(flow.nc, "INTERVENTIONS", "interventions.>")
    records = [msgspec.json.decode(s.data, type=Intervention) for s in stored]
    assert [(r.action, r.function, r.reason) for r in records] == [
        ("pause", "delivery", "carrier API down"),
        ("resume", "delivery", "carrier back"),
    ]
    assert all(r.by and r.at.endswith("Z") for r in records)
    # The resume came while the order was open (the pause before it started): on its
    # timeline, the resume only.
    [found] = (await trace.load(flow.nc, flow.topology, ["pz-0"])).values()
    assert [a.detail.split(" by ")[0] for a in found.interventions] == ["delivery resumed"]
    assert "INTERVENTION: delivery resumed by" in trace.render(found, datetime.now(UTC))


async def test_a_pause_until_a_time_ends_by_itself(start_flow: StartFlow) -> None:
    flow = await start_flow()
    done = runner(flow, "pause", "order", "--until", "2s")
    assert done.returncode == 0, done.stderr
    await flow.publish(order("pt-1"))
    await asyncio.sleep(1.0)
    assert "orders.completed" not in (await flow.by_order()).get("pt-1", [])
    seen = await flow.wait_finished(["pt-1"], timeout=20)  # no resume: the time came
    assert terminal_counts(seen, ["pt-1"]) == {"pt-1": 1}


def test_pausing_a_function_that_does_not_exist_names_the_ones_that_do() -> None:
    # No server needed: the name is checked against streams.yaml first.
    done = subprocess.run([sys.executable, str(ROOT / "runner.py"), "pause", "shipping"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NATS_URL": "nats://127.0.0.1:1"})  # fmt: skip
    assert done.returncode != 0
    assert "no function 'shipping'" in done.stderr and "payment" in done.stderr


async def test_a_filtered_redrive_dry_run_counts_what_the_real_run_redrives(
    start_flow: StartFlow, variant_config: Callable[..., Path]
) -> None:
    flow = await start_flow(config_path=variant_config(*SHORTER))
    held = [order(f"fr-{i}", token=DOWN_TOKEN) for i in range(3)]
    await flow.publish(*held, order("fr-bad", BOOK_42=0))  # an invalid one: another reason

    async def letters() -> int:
        return len(await flow.dead_letters())

    # 3 charges; the invalid order by payment and by stock.
    await value_when(letters, lambda n: n >= 4, 20, "the dead letters")
    await SimulatedGateway(KvStore(flow.nc, "gateway")).restore()
    since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")
    args = ["--config", str(flow.config), "dlq", "redrive", "--function", "payment",
            "--reason", "GatewayUnavailable", "--since", since]  # fmt: skip
    dry = runner(flow, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("3 dead letters would be redriven"), dry.stdout
    assert await letters() >= 4  # nothing redriven
    real = runner(flow, *args)
    assert real.returncode == 0, real.stderr
    assert real.stdout.strip().endswith("redrove 3 dead letters"), real.stdout
    ids = [o.order_id for o in held]
    seen = await flow.wait_finished(ids, timeout=30)
    assert terminal_counts(seen, ids) == dict.fromkeys(ids, 1)
    # The invalid order's letters did not match and are still there.
    left = await flow.dead_letters()
    assert left and all("fr-bad" in d.data.decode() for d in left)
