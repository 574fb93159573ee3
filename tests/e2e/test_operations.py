"""Operations: every function is a NATS micro service, `status` sums it up, logs carry context."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from orderflow.tools.status import ask_all
from tests.conftest import ROOT, StartFlow
from tests.flowkit import order

BAD = b'{"order_id":"op-bad","customer_id":"c","payment_token":"t","items":[]}'


def _status_json(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "status", "--json"],
        env={**os.environ, "NATS_URL": url},
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


async def test_micro_ping_info_and_stats_count_the_work(start_flow: StartFlow) -> None:
    flow = await start_flow({"payment": 2})
    good = [order(f"op-{i}") for i in range(10)] + [order(f"op-f{i}", "tok_flaky") for i in (1, 2)]
    await flow.publish(*good)
    await flow.nc.publish("orders.created", BAD)
    await flow.wait_finished([o.order_id for o in good])
    await flow.wait_quiet()

    pings = await ask_all(flow.nc, "$SRV.PING.orderflow-payment")
    assert len(pings) == 2 and len({p["id"] for p in pings}) == 2  # two instances answer
    assert {p["metadata"]["pid"] for p in pings} == {
        str(p) for p in flow.supervisor.pids("payment")
    }
    everyone = await ask_all(flow.nc, "$SRV.PING")
    assert {p["name"] for p in everyone} == {f"orderflow-{n}" for n in flow.topology.functions}

    [info, _] = await ask_all(flow.nc, "$SRV.INFO.orderflow-payment")
    assert [e["subject"] for e in info["endpoints"]] == ["orderflow.payment.messages"]

    stats = await ask_all(flow.nc, "$SRV.STATS.orderflow-payment")
    endpoints = [e for s in stats for e in s["endpoints"]]
    total = {k: sum(e["data"][k] for e in endpoints)
             for k in ("processed", "failed", "retried", "dead_lettered")}  # fmt: skip
    # 12 valid orders charged; the 2 flaky cards failed once and were retried; 1 dead letter.
    assert total == {"processed": 12, "failed": 2, "retried": 2, "dead_lettered": 1}
    assert sum(e["num_requests"] for e in endpoints) == 12  # the native micro columns agree
    assert sum(e["num_errors"] for e in endpoints) == 2
    assert all(e["processing_time"] > 0 for e in endpoints if e["num_requests"])

    out = await asyncio.to_thread(_status_json, flow.server.url)
    status = json.loads(out.stdout)
    payment = status["functions"]["payment"]
    assert (payment["instances"], payment["processed"], payment["dead_letters"]) == (2, 12, 1)
    assert "GatewayUnavailable" in payment["last_error"]
    assert status["functions"]["stock"]["dead_letters"] == 1
    assert status["functions"]["delivery"]["pending"] == 0
    assert status["streams"]["ORDERS"]["messages"] > 12


async def test_json_logs_carry_function_subject_order_and_event_ids(start_flow: StartFlow) -> None:
    flow = await start_flow({"order": 0})
    # Our own `order` process, logging every message as JSON.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "runner.py"), "--log-level", "DEBUG", "--log-format", "json",
        "run", "order",
        env={**os.environ, "NATS_URL": flow.server.url}, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await flow.publish(order("op-log"))
        await flow.wait_finished(["op-log"])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.decode().splitlines()]
    handled = [r for r in lines if r.get("order_id") == "op-log" and r["level"] == "debug"]
    by_kind = {r["kind"]: r for r in handled}
    assert set(by_kind) == {"delivery.scheduled"}  # the only outcome order reads of a happy one
    scheduled = by_kind["delivery.scheduled"]
    assert scheduled["subject"] == "order.op-log.delivery.scheduled"
    assert scheduled["function"] == "order"
    assert scheduled["event_id"] == "delivery.scheduled:op-log"
    assert "orders.completed" in scheduled["message"]
