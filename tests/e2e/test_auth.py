"""Least privilege, generated from streams.yaml, proven against a real nats-server.

Every refusal asserted here is the server's own answer: nats-py reports a
permissions violation through the connection's error callback (and a refused
request then times out), and the stream shows that nothing got through.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from functions.events import TERMINAL_SUBJECTS, CancelRequest
from orderflow import config
from orderflow.config import MODES, ConfigError, Mode, Topology
from orderflow.ops import auth, interventions
from orderflow.ops.provision import provision
from orderflow.ops.server import EmbeddedServer, free_port
from orderflow.runtime.connect import connect
from orderflow.subjects import kind_of
from orderflow.tools import status
from orderflow.tools.demo import payload
from orderflow.tools.streamlog import read_stream
from tests.conftest import ROOT
from tests.flowkit import Flow, order


@dataclass
class Secure:
    """A nats-server running the configuration ``auth`` wrote, provisioned by the admin."""

    server: EmbeddedServer
    directory: Path
    admin: Client
    monitor: str
    clients: list[Client] = field(default_factory=list)

    def env(self, user: str) -> dict[str, str]:
        return auth.identity(self.directory, user, {})

    async def connect_as(self, user: str) -> tuple[Client, list[str]]:
        """A connection as ``user``, and the errors the server sent it (lowercase)."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await connect(self.server.url, f"tests-{user}", env=self.env(user), error_cb=on_error)
        self.clients.append(nc)
        return nc, errors

    def users(self) -> dict[str, set[str]]:
        """Connection name -> the users it is connected as (the server's monitoring endpoint)."""
        with urllib.request.urlopen(f"http://{self.monitor}/connz?auth=1", timeout=5) as answer:
            connz = json.load(answer)
        users: dict[str, set[str]] = {}
        for c in connz["connections"]:
            users.setdefault(c.get("name", ""), set()).add(c.get("authorized_user", ""))
        return users

    def violations(self) -> list[str]:
        log = (self.server.store_dir / "nats-server.log").read_text()
        return [line for line in log.splitlines() if "Violation" in line]


@pytest.fixture
async def secure(tmp_path: Path, topology: Topology) -> AsyncIterator[Secure]:
    directory = tmp_path / "auth"
    auth.generate(topology, directory)
    # The generated configuration, plus the monitoring port (to see who is connected).
    generated = (directory / auth.SERVER_CONF).read_text()
    conf = json.loads("".join(line for line in generated.splitlines() if not line.startswith("#")))
    conf["http"] = f"127.0.0.1:{free_port()}"
    (tmp_path / "test.conf").write_text(json.dumps(conf))
    server = EmbeddedServer(tmp_path / "nats", config=tmp_path / "test.conf")
    server.start()
    admin = await connect(server.url, "tests-admin", env=auth.identity(directory, auth.ADMIN, {}))
    await provision(admin, topology, ROOT)
    s = Secure(server, directory, admin, monitor=str(conf["http"]))
    yield s
    for nc in (*s.clients, admin):
        await nc.close()
    server.stop()


async def _until(condition: object, what: str, timeout: float = 3.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_permissions_follow_the_topology(topology: Topology) -> None:
    users = auth.permissions(topology)
    assert set(users) == {"payment", "stock", "delivery", "order", "cancel", "client", "operator"}
    assert users["payment"].publish == (
        "$JS.API.CONSUMER.INFO.ORDERS.payment",
        "$JS.API.CONSUMER.MSG.NEXT.ORDERS.payment",
        "$JS.ACK.ORDERS.payment.>",
        "$KV.gateway.>",
        "$JS.API.DIRECT.GET.KV_gateway.$KV.gateway.>",
        "$JS.API.DIRECT.GET.KV_gateway",  # many keys at once, named in the body
        # The refund's join, read from the orders' histories: reads made
        # together from any replica, or (a cluster) from the stream's leader.
        "$JS.API.DIRECT.GET.ORDERS",
        "$JS.API.STREAM.MSG.GET.ORDERS",
        "order.*.payments.succeeded",
        "order.*.payments.failed",
        "order.*.payments.refunded",
        "order.*.orders.rejected",  # payment answers invalid orders
        "dlq.*.payment",
        "retries.*.payment",
    )
    assert users["payment"].subscribe[0] == "_INBOX_payment.>"
    # The client publishes what no function emits, and reads what no function consumes.
    # ...and may ask for a cancellation, as may the operator; no function may.
    assert users["client"].publish == ("orders.created", "order.*.orders.created", "orders.cancel")
    assert "orders.cancel" in users["operator"].publish
    assert "orders.cancel" in users["cancel"].subscribe  # the one that answers
    for name in topology.functions:
        assert "orders.cancel" not in users[name].publish
    assert set(users["client"].subscribe) == {
        "order.*.orders.completed",
        "order.*.orders.cancelled",
        "order.*.orders.rejected",
        "_INBOX_client.>",
    }
    for name in topology.functions:
        allowed = users[name].publish
        assert "orders.created" not in allowed and "order.*.orders.created" not in allowed
        # Reading one message of the orders' stream, never managing a stream.
        managing = [s for s in allowed if ".STREAM." in s and ".STREAM.MSG.GET." not in s]
        assert not [s for s in allowed if ".CREATE." in s or s == ">"] and not managing
    # A function named like a built-in user would share its credentials: refused.
    clash = msgspec.structs.replace(
        topology, functions={**topology.functions, "client": topology.functions["order"]}
    )
    with pytest.raises(ConfigError, match=r"functions\.client: the name is taken"):
        auth.permissions(clash)


def test_auth_command_writes_private_files_and_no_secret(tmp_path: Path) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "runner.py"), "auth", "--data-dir", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    first = run()
    directory = tmp_path / auth.AUTH_DIR
    envs = {p.stem: auth.read_env(p) for p in directory.glob("*.env")}
    assert set(envs) == {
        "admin",
        "client",
        "operator",
        "payment",
        "stock",
        "delivery",
        "order",
        "cancel",
    }
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conf = (directory / auth.SERVER_CONF).read_text()
    for user, env in envs.items():
        assert env["NATS_USER"] == user and env["NATS_PASSWORD"] in conf
        assert env["NATS_PASSWORD"] not in first.stdout + first.stderr
    assert "server.conf" in first.stdout and "max_payload 139264" in first.stdout
    # Every run draws new passwords.
    run()
    again = {p.stem: auth.read_env(p)["NATS_PASSWORD"] for p in directory.glob("*.env")}
    assert not set(again.values()) & {e["NATS_PASSWORD"] for e in envs.values()}


async def test_payment_may_not_emit_delivery_nor_pull_from_stock(secure: Secure) -> None:
    await secure.admin.jetstream().publish("orders.created", payload(order("au-1")))
    nc, errors = await secure.connect_as("payment")
    js = nc.jetstream(timeout=0.5)

    with pytest.raises(nats.errors.TimeoutError):  # no ack: the server dropped it
        await js.publish("order.au-1.delivery.scheduled", b'{"order_id":"au-1","tracking_id":"x"}')
    await _until(lambda: errors, "the violation")
    assert errors == ['nats: permissions violation for publish to "order.au-1.delivery.scheduled"']

    stock = await js.pull_subscribe_bind(durable="stock", stream="ORDERS")
    with pytest.raises(nats.errors.TimeoutError):
        await stock.fetch(1, timeout=0.5)
    await _until(lambda: len(errors) > 1, "the violation")
    assert errors[1] == (
        'nats: permissions violation for publish to "$js.api.consumer.msg.next.orders.stock"'
    )

    # What it may do works on the same connection: its own consumer, its own emits.
    own = await js.pull_subscribe_bind(durable="payment", stream="ORDERS")
    [msg] = await own.fetch(1, timeout=2)
    assert msg.subject == "orders.created"
    await msg.nak()
    body = b'{"order_id":"au-1","amount_cents":1,"reason":"t"}'
    ack = await js.publish("order.au-1.payments.failed", body)
    assert ack.stream == "ORDERS"

    # The server's side: stock's message was never delivered, nothing of delivery's is stored.
    info = await secure.admin.jetstream().consumer_info("ORDERS", "stock")
    assert (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (2, 0, 0)
    subjects = [s.subject for s in await read_stream(secure.admin, "ORDERS")]
    assert subjects == ["orders.created", "order.au-1.payments.failed"]
    assert any('user:payment" - Publish Violation - Subject "order.au-1.delivery.scheduled"'
               in line for line in secure.violations())  # fmt: skip


def test_only_the_operator_may_intervene(topology: Topology) -> None:
    users = auth.permissions(topology)
    operator = users["operator"].publish
    for fn in topology.functions.values():
        for c in fn.consumers:
            assert f"$JS.API.CONSUMER.PAUSE.{c.stream}.{c.durable}" in operator
    assert "$JS.API.STREAM.MSG.DELETE.DEAD_LETTERS" in operator  # a redrive's last step
    assert "interventions.>" in operator
    assert "$JS.API.STREAM.INFO.KV_stock" in operator  # what status reads of the buckets
    # It reads, and republishes what a function consumes (a redrive), but no order's end,
    # and it changes no consumer.
    assert not any(p.startswith("$JS.API.CONSUMER.CREATE") for p in operator)
    assert "order.*.payments.succeeded" in operator  # a delivery's dead letter, redriven
    assert not any(f"order.*.{k}" in operator for k in ("orders.completed", "orders.cancelled"))
    for name, allowed in users.items():
        if name != "operator":
            assert not any("CONSUMER.PAUSE" in p or "MSG.DELETE" in p for p in allowed.publish)


async def test_the_operator_pauses_and_resumes_a_function_and_a_function_cannot(
    secure: Secure, topology: Topology
) -> None:
    now = datetime.now(UTC)
    operator, _ = await secure.connect_as("operator")
    record = await interventions.pause(operator, topology, "delivery", None, "maintenance", now,
                                       "operator")  # fmt: skip
    assert record.by == "operator"
    assert (await interventions.paused(operator, topology, "delivery")) is not None
    await interventions.resume(operator, topology, "delivery", "done", now, "operator")
    assert (await interventions.paused(operator, topology, "delivery")) is None
    # What status reads, the operator may read: every stream and bucket answers.
    figures = await status.collect(operator, topology)
    assert all(row["messages"] is not None for row in figures["streams"].values()), figures

    payment, errors = await secure.connect_as("payment")
    await payment.publish("$JS.API.CONSUMER.PAUSE.ORDERS.delivery", b"{}")
    await payment.flush()
    await _until(lambda: errors, "the violation")
    assert errors == [
        'nats: permissions violation for publish to "$js.api.consumer.pause.orders.delivery"'
    ]
    info = await secure.admin.jetstream().consumer_info("ORDERS", "delivery")
    assert not info.paused


async def test_client_may_only_publish_orders_created(secure: Secure, topology: Topology) -> None:
    nc, errors = await secure.connect_as("client")
    ack = await nc.jetstream().publish("orders.created", payload(order("au-2")))
    assert (ack.stream, ack.seq) == ("ORDERS", 1)

    forbidden = sorted(
        {f"order.au-2.{k}" for fn in topology.functions.values() for k in fn.emits}
        | {
            "dlq.au-2.payment",
            "retries.au-2.stock",
            "$KV.gateway.charge.charge-au-2",
            "$KV.stock.level.BOOK-42",
            "$JS.API.STREAM.INFO.ORDERS",
            "$JS.API.STREAM.PURGE.ORDERS",
            "$JS.API.CONSUMER.CREATE.ORDERS.spy",
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.order",
            "$JS.API.DIRECT.GET.KV_stock.$KV.stock.level.BOOK-42",
            "$JS.API.DIRECT.GET.KV_stock",
            "$JS.API.DIRECT.GET.ORDERS.order.au-2.payments.succeeded",
            "$JS.API.DIRECT.GET.ORDERS",
            "$JS.API.STREAM.MSG.GET.ORDERS",
            "$JS.ACK.ORDERS.order.1.1.1.1.0",
        }
    )
    for subject in forbidden:
        await nc.publish(subject, b"{}", reply=f"{auth.inbox_prefix('client')}.x")
    await nc.flush()
    await _until(lambda: len(errors) == len(forbidden), f"{len(forbidden)} violations")
    refused = {e.split('publish to "')[1].rstrip('"') for e in errors}
    assert refused == {s.lower() for s in forbidden}

    # Reading the outcomes is allowed; reading the rest of the flow is not.
    await nc.subscribe("order.*.orders.completed")
    await nc.subscribe("order.>")
    await nc.flush()
    await _until(lambda: len(errors) > len(forbidden), "the subscription violation")
    assert errors[-1] == 'nats: permissions violation for subscription to "order.>"'
    assert [s.subject for s in await read_stream(secure.admin, "ORDERS")] == ["orders.created"]
    # The server's max_payload comes from limits.
    assert nc.max_payload == topology.limits.server_max_payload()


async def test_in_progress_then_ack_needs_the_ack_subjects(secure: Secure) -> None:
    """allow_responses alone allows one answer per message: a slow handler's ack needs more."""
    await secure.admin.jetstream().publish("order.au-3.payments.succeeded", b"{}")
    nc, errors = await secure.connect_as("delivery")
    sub = await nc.jetstream().pull_subscribe_bind(durable="delivery", stream="ORDERS")
    [msg] = await sub.fetch(1, timeout=2)
    await msg.in_progress()
    await msg.ack_sync(timeout=2)
    info = await secure.admin.jetstream().consumer_info("ORDERS", "delivery")
    assert (info.num_ack_pending, info.num_pending, errors) == (0, 0, [])


async def test_the_flow_completes_under_least_privilege(secure: Secure, topology: Topology) -> None:
    flow = Flow(secure.server, secure.admin, topology, ROOT / "streams.yaml", {}, {},
                function_env=auth.function_env(secure.directory, topology))  # fmt: skip
    flow.start()
    try:
        client, errors = await secure.connect_as("client")
        outcomes: list[Msg] = []

        async def on_outcome(msg: Msg) -> None:
            outcomes.append(msg)

        for subject in auth.outcomes(topology):
            await client.subscribe(subject, cb=on_outcome)
        orders = [
            order("sec-happy"),
            order("sec-declined", "tok_declined"),  # stock reserved, then released
            order("sec-flaky", "tok_flaky"),  # a retry, noted in the retry log
            order("sec-oos", SOLD_OUT_1=1),  # charged, then refunded
        ]
        js = client.jetstream()
        for o in orders:
            await js.publish("orders.created", payload(o))
        bad = b'{"order_id":"sec-bad","customer_id":"c","payment_token":"t","items":[]}'
        await js.publish("orders.created", bad)  # dead-lettered thrice, rejected once

        # The client reads every order's outcome.
        # Per order: a core subscriber may see one end announced twice (both
        # halves of order's join announce it; the log keeps one), never two ends.
        def ends() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = {}
            for m in outcomes:
                seen.setdefault(msgspec.json.decode(m.data)["order_id"], set()).add(
                    kind_of(m.subject)
                )
            return seen

        await _until(lambda: len(ends()) == 5, "five orders' outcomes", timeout=30)
        assert all(len(kinds) == 1 for kinds in ends().values()), ends()
        by_order = {order_id: kinds.pop() for order_id, kinds in ends().items()}
        assert by_order == {
            "sec-happy": "orders.completed",
            "sec-declined": "orders.cancelled",
            "sec-flaky": "orders.completed",
            "sec-oos": "orders.cancelled",
            "sec-bad": "orders.rejected",
        }
        await flow.wait_quiet()
        seen = await flow.by_order()
        assert "stock.released" in seen["sec-declined"]
        assert "payments.refunded" in seen["sec-oos"]
        assert {d.function for d in await flow.dead_letters()} == {"payment", "stock"}
        # The flaky card's retry was noted (and sec-oos's, when stock was quicker than payment).
        notes = await flow.read("RETRIES")
        # retries.<ID>.<function>: the flaky card's (and maybe a release that
        # outran its reservation, which stock retries until it is decided).
        noted = {n.subject.split(".")[2] for n in notes}
        assert "payment" in noted and noted <= {"payment", "stock"}
        assert "sec-flaky" in {msgspec.json.decode(n.data)["order_id"] for n in notes}
        # Every function answers its micro service requests through its permissions.
        current = await status.collect(secure.admin, topology)
        assert {n: f["instances"] for n, f in current["functions"].items()} == dict.fromkeys(
            topology.functions, 1
        )
        assert not TERMINAL_SUBJECTS - set(by_order.values())
        # Each function process is connected as its own user.
        users = secure.users()
        for name in topology.functions:
            assert users[f"orderflow-{name}"] == {name}
        assert users["tests-client"] == {"client"} and users["tests-admin"] == {"admin"}
        # The client asks for a cancellation; the cancel function answers through its own
        # permissions (reads the history, answers on the client's inbox).
        request = CancelRequest("sec-happy", reason="changed my mind", requested_by="client")
        late = await interventions.cancel(client, topology, request)
        assert (late.answer, late.rule) == ("too late", "the order is already completed")
        await flow.assert_stock_conserved()
        assert errors == []
        assert secure.violations() == []
    finally:
        await flow.stop()


@pytest.mark.parametrize("mode", MODES)
def test_demo_secure_runs_every_function_as_its_own_user(tmp_path: Path, mode: Mode) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "runner.py"), "demo", "--secure", "--orders", "20",
         "--json", "--timeout", "60", "--data-dir", str(tmp_path), "--mode", mode],
        env={k: v for k, v in os.environ.items() if k != "NATS_URL"},
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["orders"], summary["unfinished"]) == (20, 0)
    server_log = (tmp_path / "nats" / "nats-server.log").read_text()
    assert "Using configuration file" in server_log and "Violation" not in server_log
    users = {p.stem for p in (tmp_path / "auth").glob("*.env")}
    assert users == {
        *config.load(ROOT / "streams.yaml", mode).functions,
        "client",
        "admin",
        "operator",
    }
    passwords = [auth.read_env(p)["NATS_PASSWORD"] for p in (tmp_path / "auth").glob("*.env")]
    logs = done.stdout + done.stderr + "".join(p.read_text() for p in tmp_path.glob("logs/*"))
    assert not [p for p in passwords if p in logs]
