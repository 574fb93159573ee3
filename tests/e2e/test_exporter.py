"""``runner.py exporter`` against the running flow: its answer read with prometheus_client's parser.

The exporter runs as its own process, as deployed, and every figure it serves is
checked against what the flow really did: the log, the consumers, the dead letters.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from orderflow import subjects
from orderflow.tools.status import ask_all
from tests.conftest import ROOT, StartFlow
from tests.flowkit import order
from tests.waiting import until


def _scrape(url: str) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(url, timeout=20) as answer:
        text = answer.read().decode()
    families = text_string_to_metric_families(text)
    return {f.name: f.samples for f in families}


def _value(families: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    name = re.sub(r"_(total|bucket|count|sum)$", "", sample)
    found = [s for s in families[name] if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, (sample, labels, found)
    return found[0].value


def _summed(families: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    name = re.sub(r"_(total|bucket|count|sum)$", "", sample)
    return sum(s.value for s in families[name]
               if s.name == sample and labels.items() <= s.labels.items())  # fmt: skip


class Exporter:
    """``runner.py exporter --port 0`` as its own process, against the test's server."""

    def __init__(self, url: str) -> None:
        env = {**os.environ, "NATS_URL": url}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "runner.py"), "exporter", "--port", "0"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # "exporter on http://127.0.0.1:PORT/metrics (...)"
        match = re.search(r"exporter on (http://\S+)", line)
        if match is None:
            self.process.kill()
            raise AssertionError(f"the exporter did not start: {line!r}")
        self.url = match[1]

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=10)


async def test_the_exporter_serves_the_whole_flow_in_prometheus_text(
    start_flow: StartFlow,
) -> None:
    flow = await start_flow(replicas={"stock": 2})
    orders = [order("ex-happy"), order("ex-declined", token="tok_declined"),
              order("ex-flaky", token="tok_flaky")]  # fmt: skip
    await flow.publish(*orders)
    await flow.nc.publish(subjects.INGRESS, b'{"order_id":"ex-bad","customer_id":"c-7",'
                          b'"items":[],"payment_token":"tok_visa"}')  # fmt: skip
    await flow.wait_finished([o.order_id for o in orders], timeout=30)
    await flow.wait_quiet()

    async def both_stocks_answer() -> bool:
        return len(await ask_all(flow.nc, subjects.service_api("PING", "stock"))) == 2

    await until(both_stocks_answer, 30, "both stock processes serving")
    exporter = await asyncio.to_thread(Exporter, flow.server.url)
    try:
        families = await asyncio.to_thread(_scrape, exporter.url)
        assert _value(families, "orderflow_up") == 1
        for name in flow.topology.functions:
            expected = 2 if name == "stock" else 1
            assert _value(families, "orderflow_function_instances", function=name) == expected

        # What each function did, summed over its instances.
        assert _summed(families, "orderflow_messages_retried_total", function="payment") == 1
        assert _summed(families, "orderflow_messages_failed_total", function="payment") == 1
        for name in ("payment", "stock"):
            assert _summed(families, "orderflow_messages_dead_lettered_total", function=name) == 1
        # Each function processed once each message of its consumers' kinds in the log
        # (payment: the valid orders, its flaky attempt failed first, the invalid one is
        # a dead letter; and the declined order's closed delivery decision).
        events = await flow.events()
        closed = sum(e.kind == "delivery.cancelled" for e in events)
        assert closed == 1
        assert (
            _summed(families, "orderflow_messages_processed_total", function="payment")
            == 3 + closed
        )
        for name in ("delivery", "order"):
            kinds = {k for c in flow.topology.functions[name].consumers for k in c.events}
            expected = sum(e.kind in kinds for e in events)
            assert (
                _summed(families, "orderflow_messages_processed_total", function=name) == expected
            )

        # One histogram per instance, consistent with its counter.
        for s in families["orderflow_messages_processed"]:
            labels = {k: s.labels[k] for k in ("function", "service_id")}
            count = _value(families, "orderflow_handler_duration_seconds_count", **labels)
            assert count == s.value
            buckets = [
                b
                for b in families["orderflow_handler_duration_seconds"]
                if b.name.endswith("_bucket") and labels.items() <= b.labels.items()
            ]
            assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count
            assert [b.value for b in buckets] == sorted(b.value for b in buckets)
            total = _value(families, "orderflow_handler_duration_seconds_sum", **labels)
            assert (total > 0) == (count > 0)

        # Every consumer, settled; deliveries at least what was processed.
        for c in flow.topology.functions["payment"].consumers:
            labels = {"function": "payment", "consumer": c.durable}
            assert _value(families, "orderflow_consumer_pending", **labels) == 0
            assert _value(families, "orderflow_consumer_ack_pending", **labels) == 0
            # Four orders, the flaky one twice, and the declined one's closed decision.
            assert _value(families, "orderflow_consumer_delivered_total", **labels) == 5 + closed

        # The log, counted: orders by status, dead letters by function and reason.
        assert _value(families, "orderflow_stream_messages", stream="ORDERS") == len(events)
        status = {s.labels["status"]: s.value for s in families["orderflow_orders"]}
        assert status == {"created": 4, "completed": 2, "cancelled": 1, "rejected": 1}
        assert _value(families, "orderflow_orders_unfinished") == 0
        letters = {(s.labels["function"], s.labels["reason"]): s.value
                   for s in families["orderflow_dead_letters"]}  # fmt: skip
        assert letters == {("payment", "invalid"): 1, ("stock", "invalid"): 1}

        # Counted on from where the last scrape stopped: new orders, a letter redriven away.
        await flow.publish(order("ex-later"), order("ex-later-oos", SOLD_OUT_1=1))
        await flow.wait_finished(["ex-later", "ex-later-oos"], timeout=30)
        [payment_letter] = [d for d in await flow.dead_letters() if d.function == "payment"]
        await flow.nc.jetstream().delete_msg(flow.topology.dead_letters.stream, payment_letter.id)
        families = await asyncio.to_thread(_scrape, exporter.url)
        status = {s.labels["status"]: s.value for s in families["orderflow_orders"]}
        assert status == {"created": 6, "completed": 3, "cancelled": 2, "rejected": 1}
        letters = {(s.labels["function"], s.labels["reason"]): s.value
                   for s in families["orderflow_dead_letters"]}  # fmt: skip
        assert letters == {("stock", "invalid"): 1}

        # The dashboard asks only for what the exporter serves.
        dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
        asked = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
                 for name in re.findall(r"\b(orderflow_[a-z_]+)", target["expr"])}  # fmt: skip
        served = {s.name for samples in families.values() for s in samples}
        assert asked and asked <= served, asked - served
    finally:
        assert await asyncio.to_thread(exporter.stop) == 0
