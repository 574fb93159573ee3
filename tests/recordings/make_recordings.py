"""Make the recordings in this folder: each scenario on a fresh server, recorded with `record`.

    python tests/recordings/make_recordings.py [NAME...]

Each scenario gets its own embedded nats-server, every function as its own
process, orders published as plain core messages (like `nats pub`), a wait
until everything is settled, then `runner.py record` writes the ORDERS stream
here. Rerun it after a deliberate change of behaviour, and review the diff.
A scenario whose name starts with ``orchestration_`` runs in that mode.

``mixed_300_schema_v1.jsonl`` is ``mixed_300`` as schema version 1 of
``delivery.scheduled`` wrote it (no carrier, and no ``Orderflow-Schema-Version``
header on any event, as before events said their version): replayed through
the upcasters (``functions/upcasters.py``, ``tests/e2e/test_replay.py``). It
was first recorded by the version 1 code; since then the flow itself changed
(a cancelled order closes its delivery decision), which no old recording can
replay, so it is derived again from each new ``mixed_300`` by :func:`as_v1`:
exactly what the version 1 ``delivery`` wrote, nothing else changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from functions.events import OrderCreated, OrderItem
from orderflow import config
from orderflow.ops.provision import provision
from orderflow.ops.server import EmbeddedServer
from orderflow.ops.supervisor import Supervisor
from orderflow.runtime.connect import connect
from orderflow.runtime.context import SCHEMA_VERSION
from orderflow.tools.demo import make_orders, payload
from orderflow.tools.replay import wait_until_quiet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def order(order_id: str, token: str = "tok_visa", **skus: int) -> OrderCreated:
    items = [
        OrderItem(sku.replace("_", "-"), n, 1500) for sku, n in (skus or {"BOOK_42": 2}).items()
    ]
    return OrderCreated(order_id, customer_id="c-7", items=items, payment_token=token)


SCENARIOS: dict[str, list[bytes]] = {
    "happy": [payload(order("rec-happy"))],
    "declined": [payload(order("rec-declined", token="tok_declined"))],
    "flaky": [payload(order("rec-flaky", token="tok_flaky"))],
    "out_of_stock": [payload(order("rec-oos", BOOK_42=1, SOLD_OUT_1=1))],
    "both_failures": [payload(order("rec-both", token="tok_declined", SOLD_OUT_1=2))],
    "rejected": [
        b'{"order_id":"rec-bad","customer_id":"c-7","payment_token":"tok_visa",'
        b'"items":[{"sku":"BOOK-42","quantity":0,"unit_price_cents":1500}]}'
    ],
    "mixed_300": [payload(o) for _, o in make_orders(300, run_id="rec-mix", seed=300)],
    "orchestration_mixed_100": [
        payload(o) for _, o in make_orders(100, run_id="rec-orch", seed=100)
    ],
}


def mode_of(name: str) -> config.Mode:
    return "orchestration" if name.startswith("orchestration_") else "choreography"


async def make(name: str, payloads: list[bytes]) -> None:
    topology = config.load(ROOT / "streams.yaml", mode_of(name))
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        counts = dict.fromkeys(topology.functions, 1)
        supervisor = Supervisor(
            server.url, ROOT / "streams.yaml", counts, log_dir=Path(tmp), mode=topology.mode
        )
        nc = await connect(server.url, name="make-recordings")
        try:
            await provision(nc, topology, ROOT)
            supervisor.start()
            for data in payloads:
                await nc.publish("orders.created", data)
            await nc.flush()
            await asyncio.sleep(0.5)
            await wait_until_quiet(nc, topology, timeout=120)
            await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(ROOT / "runner.py"), "record", str(HERE / f"{name}.jsonl")],
                env={**os.environ, "NATS_URL": server.url},
                cwd=ROOT,
                check=True,
            )
        finally:
            await nc.close()
            supervisor.stop()
            server.stop()


def as_v1(source: Path, target: Path) -> None:
    """``source`` as written before schema versions: ``delivery.scheduled`` without its
    carrier, no event saying its version."""
    lines = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        record.get("headers", {}).pop(SCHEMA_VERSION, None)
        if record.get("subject", "").endswith(".delivery.scheduled"):
            event = json.loads(record["payload"])
            event.pop("carrier")
            record["payload"] = json.dumps(event, separators=(",", ":"))
        lines.append(json.dumps(record, separators=(",", ":")))
    target.write_text("\n".join(lines) + "\n")


async def main() -> None:
    for name, payloads in SCENARIOS.items():
        if name in sys.argv[1:] or len(sys.argv) == 1:
            await make(name, payloads)
    if "mixed_300" in sys.argv[1:] or len(sys.argv) == 1:
        as_v1(HERE / "mixed_300.jsonl", HERE / "mixed_300_schema_v1.jsonl")


if __name__ == "__main__":
    asyncio.run(main())
